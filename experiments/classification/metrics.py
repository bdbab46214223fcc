"""Multi-label metrics for EUR-Lex (EUROVOC labels), vectorized over (documents x labels).

Inputs
    scores         (N, L) logits over the training label space; a torch tensor (any float dtype, any device) or a
                   numpy array. float64 stays float64; every other dtype (bf16, fp16, ints) is upcast to float32
                   before anything else. The caller's array is never modified.
    targets        (N, L) multi-hot over the same label space; any nonzero entry is a gold label.
    n_unseen_gold  optional (N,) non-negative ints: gold concepts of each document that lie OUTSIDE the label space
                   (never seen in training). The model cannot predict them, but they are gold, so they are counted
                   as missed, never dropped.

Rules (each one is tested in tests/test_metrics.py)
    prediction     label is predicted iff sigmoid(logit) > threshold, evaluated exactly as logit > log(t/(1-t))
                   (= logit > 0 for t = 0.5); no sigmoid is computed, so large logits cannot overflow and tiny
                   positive logits are not lost to float rounding of sigmoid.
    non-finite     a NaN or infinite logit anywhere makes every quality metric NaN: such scores rank and threshold
                   arbitrarily (an all-NaN row would tie to label 0 and could score P@1 = 1), so a model that
                   produced them gets no score; `nonfinite_scores` = number of NaN/+inf/-inf entries in `scores`.
    micro_f1       2TP / (2TP + FP + FN) pooled over all (doc, label) pairs; FN includes every unseen gold label;
                   0.0 when the denominator is 0 (no gold and no predictions at all).
    macro_f1       the plan's "average across all labels": mean of per-label F1 = 2TP_l / (2TP_l + FP_l + FN_l) over
                   ALL L labels of the label space, a label with 0/0 (no gold and no prediction) scoring 0: exactly
                   scikit-learn's f1_score(average="macro", zero_division=0). Labels never predicted and never gold
                   in the evaluated set drag it down, so it depends on how many labels the evaluated set covers.
                   Unseen labels have no column and are not part of it. NaN only when L = 0.
    macro_f1_present_labels  the same mean over only the labels with at least one gold positive in the evaluated
                   set (scikit-learn's macro F1 with labels=those labels); a label with gold but no prediction
                   scores 0; labels without gold are left out, though their false positives still count in
                   micro_f1. NaN when no label has a gold positive.
    ranking        labels ordered by score descending, ties broken by the lower label index (deterministic, for
                   every dtype: bf16 logits tie often). If L < k, only the L labels are ranked (the divisor stays k).
    precision_at_k (relevant labels among the top k) / k, averaged over ALL N documents, k in {1, 3, 5}; a document
                   with no gold label in the label space scores 0.
    R_t            number of gold labels of document t = gold in the label space + n_unseen_gold[t].
    rp_at_5        EURLEX57K R-Precision@K (Chalkidis et al., ACL 2019): mean over documents with R_t > 0 of
                   (relevant in top K) / min(K, R_t), K = 5. Unseen gold counts in R_t, so a document whose gold is
                   all unseen scores 0.
    ndcg_at_5      EURLEX57K nDCG@K: mean over documents with R_t > 0 of DCG@K / IDCG@K with
                   DCG@K = sum_{k=1..K} rel(k) / log2(k + 1) (binary rel) and IDCG@K = sum_{k=1..min(K, R_t)}
                   1 / log2(k + 1) (ideal hits include unseen gold).
    no-gold docs   documents with R_t = 0 are excluded from rp_at_5 / ndcg_at_5 (0/0) and counted in
                   `n_docs_no_gold`; they stay in micro/macro F1 (their predictions are false positives) and in
                   precision_at_k. rp_at_5 / ndcg_at_5 are NaN when no document has gold (or N = 0).
    counts         `n_docs` = N, `nonfinite_scores`, `n_docs_no_gold`, `n_unseen_gold` (total) are ints.

Cost: O(N*L) element-wise passes plus np.partition per row; no Python loop over documents or labels.
Only numpy and torch are needed.
"""
from __future__ import annotations

import math

import numpy as np

try:  # torch is optional for numpy callers
    import torch
except ImportError:  # pragma: no cover
    torch = None

__all__ = ["multilabel_metrics", "topk_indices"]

_K = 5
_PRECISION_KS = (1, 3, 5)


def _scores_to_numpy(scores) -> np.ndarray:
    if torch is not None and isinstance(scores, torch.Tensor):
        t = scores.detach()
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        return t.to(device="cpu", dtype=dtype).numpy()
    a = np.asarray(scores)
    return a if a.dtype == np.float64 else a.astype(np.float32)


def _targets_to_bool(targets) -> np.ndarray:
    if torch is not None and isinstance(targets, torch.Tensor):
        return (targets.detach() != 0).cpu().numpy()
    return np.asarray(targets) != 0


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, min(k, L)) label indices of the top-k scores per row, score descending, ties -> lower index first.

    `scores` must be NaN-free (multilabel_metrics maps NaN to -inf first). Vectorized: the k-th largest value per
    row comes from np.partition; everything above it is taken, and the values equal to it are filled in by
    increasing label index (a cumulative sum is only computed for the rows where the tie is actually split).
    """
    n, n_labels = scores.shape
    k = min(k, n_labels)
    if n == 0 or k == 0:
        return np.zeros((n, k), dtype=np.int64)
    if k == n_labels:
        return np.argsort(-scores, axis=1, kind="stable")
    kth = np.partition(scores, n_labels - k, axis=1)[:, n_labels - k][:, None]  # k-th largest per row
    greater = scores > kth
    equal = scores == kth
    need = k - greater.sum(axis=1)  # how many of the tied values each row still takes (>= 1)
    n_equal = equal.sum(axis=1)
    selected = greater | equal  # correct for rows where all tied values fit
    split_rows = np.flatnonzero(n_equal > need)
    if split_rows.size:
        eq_sub = equal[split_rows]
        keep = eq_sub & (np.cumsum(eq_sub, axis=1, dtype=np.int32) <= need[split_rows, None])
        selected[split_rows] = greater[split_rows] | keep
    cols = np.nonzero(selected)[1].reshape(n, k)  # row-major: ascending label index within each row
    vals = np.take_along_axis(scores, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable: equal scores keep the lower index first
    return np.take_along_axis(cols, order, axis=1)


def multilabel_metrics(scores, targets, *, n_unseen_gold=None, threshold: float = 0.5) -> dict[str, float]:
    """Micro/macro F1, P@{1,3,5}, RP@5, nDCG@5 of logits `scores` against multi-hot `targets`. Rules: module doc."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
    s = _scores_to_numpy(scores)
    gold = _targets_to_bool(targets)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (N, L), got shape {s.shape}")
    if gold.shape != s.shape:
        raise ValueError(f"targets shape {gold.shape} != scores shape {s.shape}")
    n_docs, n_labels = s.shape
    if n_unseen_gold is None:
        unseen = np.zeros(n_docs, dtype=np.int64)
    else:
        if torch is not None and isinstance(n_unseen_gold, torch.Tensor):
            n_unseen_gold = n_unseen_gold.detach().cpu().numpy()
        unseen = np.asarray(n_unseen_gold)
        if unseen.shape != (n_docs,):
            raise ValueError(f"n_unseen_gold must have shape ({n_docs},), got {unseen.shape}")
        if unseen.size and (not np.issubdtype(unseen.dtype, np.integer) or unseen.min() < 0):
            raise ValueError("n_unseen_gold must hold non-negative integers")
        unseen = unseen.astype(np.int64)

    finite = np.isfinite(s)
    nonfinite = int(finite.size - np.count_nonzero(finite))

    # --- thresholded predictions: logit > logit(threshold), exact -------------------------------------------------
    cut = math.log(threshold) - math.log1p(-threshold)
    pred = s > cut
    gold_per_label = gold.sum(axis=0, dtype=np.int64)
    pred_per_label = pred.sum(axis=0, dtype=np.int64)
    tp_per_label = np.logical_and(pred, gold).sum(axis=0, dtype=np.int64)
    n_unseen_total = int(unseen.sum())

    tp = int(tp_per_label.sum())
    fp = int(pred_per_label.sum()) - tp
    fn = int(gold_per_label.sum()) - tp + n_unseen_total
    micro_den = 2 * tp + fp + fn
    micro_f1 = 2 * tp / micro_den if micro_den else 0.0

    f1_den = pred_per_label + gold_per_label  # = 2TP + FP + FN per label
    f1_per_label = np.divide(2.0 * tp_per_label, f1_den, out=np.zeros(n_labels, dtype=np.float64), where=f1_den > 0)
    has_gold = gold_per_label > 0
    macro_f1 = float(f1_per_label.mean()) if n_labels else float("nan")
    macro_f1_present = float(f1_per_label[has_gold].mean()) if has_gold.any() else float("nan")

    # --- ranking metrics ------------------------------------------------------------------------------------------
    top = topk_indices(s, _K)  # (N, min(5, L))
    rel = np.take_along_axis(gold, top, axis=1)  # bool (N, k')
    out: dict[str, float] = {"micro_f1": float(micro_f1), "macro_f1": macro_f1,
                             "macro_f1_present_labels": macro_f1_present}
    for k in _PRECISION_KS:
        hits = rel[:, :k].sum(axis=1)
        out[f"precision_at_{k}"] = float(hits.mean() / k) if n_docs else float("nan")

    r_t = gold.sum(axis=1, dtype=np.int64) + unseen
    has_any = r_t > 0
    discounts = 1.0 / np.log2(np.arange(2, _K + 2, dtype=np.float64))  # 1/log2(k+1), k = 1..K
    if has_any.any():
        rel_d = rel[has_any]
        ideal_hits = np.minimum(_K, r_t[has_any])
        rp = rel_d.sum(axis=1) / ideal_hits
        dcg = rel_d.astype(np.float64) @ discounts[: rel_d.shape[1]]
        idcg = np.cumsum(discounts)[ideal_hits - 1]
        rp_at_5, ndcg_at_5 = float(rp.mean()), float((dcg / idcg).mean())
    else:
        rp_at_5 = ndcg_at_5 = float("nan")
    out["rp_at_5"] = rp_at_5
    out["ndcg_at_5"] = ndcg_at_5
    if nonfinite:
        out = {key: float("nan") for key in out}
    out["nonfinite_scores"] = nonfinite
    out["n_docs"] = int(n_docs)
    out["n_docs_no_gold"] = int(n_docs - np.count_nonzero(has_any))
    out["n_unseen_gold"] = n_unseen_total
    return out
