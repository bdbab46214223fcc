"""experiments/classification/metrics.py against scikit-learn, a brute-force per-document reference, and hand-worked
tiny cases (unseen gold, ties, bf16/fp16 logits, NaN/inf logits, documents without gold)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, ndcg_score

from experiments.classification.metrics import multilabel_metrics, topk_indices

D = [1.0 / math.log2(k + 1) for k in range(1, 6)]  # DCG discounts for ranks 1..5
KEYS = {
    "micro_f1", "macro_f1", "macro_f1_present_labels", "precision_at_1", "precision_at_3", "precision_at_5",
    "rp_at_5", "ndcg_at_5", "nonfinite_scores", "n_docs", "n_docs_no_gold", "n_unseen_gold",
}


# ---------------------------------------------------------------------------------------------------------------------
# Brute-force reference: Python loops over documents and labels, written straight from the definitions.
# ---------------------------------------------------------------------------------------------------------------------
def reference(scores, gold, unseen=None, cut=0.0):
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(gold) != 0
    n, n_labels = s.shape
    unseen = np.zeros(n, dtype=int) if unseen is None else np.asarray(unseen)
    tp = fp = fn = 0
    tp_l, fp_l, fn_l = [0] * n_labels, [0] * n_labels, [0] * n_labels
    p_at = {1: [], 3: [], 5: []}
    rps, ndcgs, no_gold = [], [], 0
    for i in range(n):
        for j in range(n_labels):
            pred = (not math.isnan(s[i, j])) and s[i, j] > cut
            if pred and g[i, j]:
                tp += 1
                tp_l[j] += 1
            elif pred:
                fp += 1
                fp_l[j] += 1
            elif g[i, j]:
                fn += 1
                fn_l[j] += 1
        fn += int(unseen[i])
        # ranking: score descending, NaN as -inf, ties -> lower label index
        order = sorted(range(n_labels), key=lambda j: (math.inf if math.isnan(s[i, j]) else -s[i, j], j))
        rel = [bool(g[i, j]) for j in order[:5]]
        for k in (1, 3, 5):
            p_at[k].append(sum(rel[:k]) / k)
        r_t = int(g[i].sum()) + int(unseen[i])
        if r_t == 0:
            no_gold += 1
            continue
        rps.append(sum(rel) / min(5, r_t))
        dcg = sum(D[r] for r in range(len(rel)) if rel[r])
        idcg = sum(D[r] for r in range(min(5, r_t)))
        ndcgs.append(dcg / idcg)
    f1_l = [2 * tp_l[j] / (2 * tp_l[j] + fp_l[j] + fn_l[j]) if (2 * tp_l[j] + fp_l[j] + fn_l[j]) else 0.0
            for j in range(n_labels)]
    with_gold = [f1_l[j] for j in range(n_labels) if g[:, j].any()]
    return {
        "micro_f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0,
        "macro_f1": sum(f1_l) / n_labels,
        "macro_f1_present_labels": sum(with_gold) / len(with_gold) if with_gold else math.nan,
        **{f"precision_at_{k}": sum(v) / n for k, v in p_at.items()},
        "rp_at_5": sum(rps) / len(rps) if rps else math.nan,
        "ndcg_at_5": sum(ndcgs) / len(ndcgs) if ndcgs else math.nan,
        "n_docs_no_gold": no_gold,
    }


def assert_matches(got, want):
    for key, value in want.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12), key


def random_case(seed, n=50, n_labels=30, p=0.1, empty_labels=3, every_doc_has_gold=False):
    rng = np.random.default_rng(seed)
    gold = rng.random((n, n_labels)) < p  # ~3 gold labels per document
    gold[:, :empty_labels] = False  # labels with no gold in the evaluated set
    if every_doc_has_gold:
        empty = ~gold.any(axis=1)
        gold[empty, rng.integers(empty_labels, n_labels, empty.sum())] = True
    scores = rng.normal(-1.0, 1.5, (n, n_labels)).astype(np.float32)  # continuous: tie-free
    return rng, scores, gold


# ---------------------------------------------------------------------------------------------------------------------
# scikit-learn agreement
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_f1_matches_sklearn(seed):
    _, scores, gold = random_case(seed)
    pred = scores > 0
    m = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(gold.astype(np.float32)))
    with_gold = np.flatnonzero(gold.sum(axis=0) > 0)
    assert len(with_gold) < gold.shape[1]  # the macro variants really differ here
    assert m["micro_f1"] == pytest.approx(f1_score(gold, pred, average="micro", zero_division=0), abs=1e-12)
    # the plan's macro-F1 ("average across all labels") is scikit-learn's default macro average over every column
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0), abs=1e-12)
    assert m["macro_f1_present_labels"] == pytest.approx(
        f1_score(gold, pred, average="macro", labels=with_gold, zero_division=0), abs=1e-12)
    assert m["macro_f1_present_labels"] > m["macro_f1"] > 0
    assert set(m) == KEYS and m["n_docs"] == 50 and m["nonfinite_scores"] == 0


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_ndcg_matches_sklearn(seed):
    # sklearn's ideal DCG is over the given targets and averages tied scores: tie-free scores, no unseen gold,
    # every document with gold (sklearn scores a gold-less document 0 and keeps it in the mean).
    _, scores, gold = random_case(seed, every_doc_has_gold=True)
    m = multilabel_metrics(scores, gold)
    assert m["n_docs_no_gold"] == 0
    assert m["ndcg_at_5"] == pytest.approx(ndcg_score(gold.astype(int), scores, k=5), abs=1e-12)


@pytest.mark.parametrize("seed", [20, 21, 22, 23])
def test_random_with_unseen_matches_bruteforce(seed):
    rng, scores, gold = random_case(seed)
    unseen = rng.integers(0, 3, len(gold))
    m = multilabel_metrics(scores, gold, n_unseen_gold=unseen)
    assert_matches(m, reference(scores, gold, unseen))
    assert m["n_unseen_gold"] == int(unseen.sum())


def test_heavy_ties_match_bruteforce():
    # integer logits: many ties, including ties split by the top-5 boundary -> lower label index wins
    rng = np.random.default_rng(5)
    scores = rng.integers(-2, 3, (60, 12)).astype(np.float32)
    gold = rng.random((60, 12)) < 0.25
    unseen = rng.integers(0, 2, 60)
    assert_matches(multilabel_metrics(scores, gold, n_unseen_gold=unseen), reference(scores, gold, unseen))
    for row in scores[:10]:
        want = sorted(range(12), key=lambda j: (-row[j], j))[:5]
        assert topk_indices(row[None], 5)[0].tolist() == want


def test_topk_tie_breaking():
    assert topk_indices(np.zeros((1, 7), np.float32), 5).tolist() == [[0, 1, 2, 3, 4]]
    assert topk_indices(np.array([[0, 0, 0, 1, 0, 0, 0]], np.float32), 3).tolist() == [[3, 0, 1]]
    assert topk_indices(np.array([[-np.inf, 2, -np.inf, np.inf, 2]], np.float32), 5).tolist() == [[3, 1, 4, 0, 2]]
    assert topk_indices(np.array([[5.0, 1.0, 3.0]]), 5).tolist() == [[0, 2, 1]]  # L < k: all L labels, ranked


# ---------------------------------------------------------------------------------------------------------------------
# hand-worked tiny case (3 documents, 5 labels)
# ---------------------------------------------------------------------------------------------------------------------
TINY_SCORES = [
    [2.0, -1.0, 0.5, -3.0, 1.0],  # doc0: pred {0,2,4}; rank 0,4,2,1,3; gold {0,3}       -> rel 1,0,0,0,1
    [-0.5, 3.0, -2.0, 0.0, -1.0],  # doc1: pred {1} (0.0 is not > 0); rank 1,3,0,4,2; gold {1,2} -> rel 1,0,0,0,1
    [0.1, 0.1, -0.2, 0.3, -5.0],  # doc2: pred {0,1,3}; rank 3,0,1,2,4 (tie: 0 before 1); no gold
]
TINY_GOLD = [[1, 0, 0, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]


def test_tiny_hand_computed_without_unseen():
    m = multilabel_metrics(np.array(TINY_SCORES), np.array(TINY_GOLD))
    # TP = 2 (doc0 label0, doc1 label1); 7 predictions -> FP = 5; 4 gold -> FN = 2: micro = 4 / (4 + 5 + 2)
    assert m["micro_f1"] == pytest.approx(4 / 11)
    # per label F1 = 2TP/(#pred + #gold): l0 2/(2+1), l1 2/(2+1), l2 0/(1+1), l3 0/(1+1), l4 0/(1+0) (no gold)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 5)  # all 5 labels; l4 (no gold, predicted) scores 0
    assert m["macro_f1_present_labels"] == pytest.approx((2 / 3 + 2 / 3 + 0 + 0) / 4)  # labels with gold: 0..3
    assert m["precision_at_1"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["precision_at_3"] == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    assert m["precision_at_5"] == pytest.approx((2 / 5 + 2 / 5 + 0) / 3)  # doc2 (no gold) counts as 0
    # RP@5 over doc0, doc1 (doc2 has no gold: excluded, counted): 2/min(5,2) and 2/min(5,2)
    assert m["rp_at_5"] == pytest.approx(1.0)
    # nDCG: both docs hit at ranks 1 and 5; IDCG over 2 ideal hits
    assert m["ndcg_at_5"] == pytest.approx((D[0] + D[4]) / (D[0] + D[1]))
    assert m["ndcg_at_5"] == pytest.approx(1.38685280723 / 1.63092975357)
    assert m["n_docs_no_gold"] == 1 and m["n_docs"] == 3 and m["n_unseen_gold"] == 0
    assert_matches(m, reference(TINY_SCORES, TINY_GOLD))


def test_tiny_unseen_gold_counts_as_missed():
    base = multilabel_metrics(np.array(TINY_SCORES), np.array(TINY_GOLD))
    m = multilabel_metrics(np.array(TINY_SCORES), np.array(TINY_GOLD), n_unseen_gold=np.array([0, 1, 0]))
    # doc1 has a third gold concept outside the label space: FN 2 -> 3, micro = 4 / (4 + 5 + 3); recall 2/4 -> 2/5
    assert m["micro_f1"] == pytest.approx(1 / 3) and m["micro_f1"] < base["micro_f1"]
    assert m["macro_f1"] == base["macro_f1"]  # unseen labels have no column
    assert m["macro_f1_present_labels"] == base["macro_f1_present_labels"]
    for k in (1, 3, 5):
        assert m[f"precision_at_{k}"] == base[f"precision_at_{k}"]
    # R_1 = 3: RP = (2/2 + 2/min(5,3)) / 2; IDCG of doc1 uses 3 ideal hits
    assert m["rp_at_5"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["ndcg_at_5"] == pytest.approx(((D[0] + D[4]) / (D[0] + D[1]) + (D[0] + D[4]) / (D[0] + D[1] + D[2])) / 2)
    assert m["ndcg_at_5"] == pytest.approx((0.85034491 + 0.65082052) / 2, abs=1e-7)  # 1.38685/1.63093, /2.13093
    assert m["n_unseen_gold"] == 1


def test_document_with_only_unseen_gold_enters_rp_with_zero():
    # doc2 gets 6 unseen gold concepts and nothing in the label space: R_2 = 6 -> it now counts, with 0 hits
    m = multilabel_metrics(np.array(TINY_SCORES), np.array(TINY_GOLD), n_unseen_gold=[0, 0, 6])
    assert m["n_docs_no_gold"] == 0
    assert m["rp_at_5"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["ndcg_at_5"] == pytest.approx(2 * (D[0] + D[4]) / (D[0] + D[1]) / 3)
    assert m["micro_f1"] == pytest.approx(4 / (4 + 5 + 2 + 6))


def test_all_zero_target_document():
    scores = np.array([[3.0, 2.0, 1.0, -1.0, -2.0], [3.0, 2.0, 1.0, -1.0, -2.0]], np.float32)
    gold = np.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    m = multilabel_metrics(scores, gold)
    assert m["n_docs_no_gold"] == 1
    assert m["rp_at_5"] == pytest.approx(1.0)  # doc0 only: 1 hit / min(5, 1)
    assert m["ndcg_at_5"] == pytest.approx(D[1] / D[0])  # hit at rank 2
    assert m["precision_at_1"] == 0.0 and m["precision_at_3"] == pytest.approx((1 / 3 + 0) / 2)
    # doc1's three predictions are false positives: TP 1, FP 5, FN 0
    assert m["micro_f1"] == pytest.approx(2 / (2 + 5))
    none = multilabel_metrics(scores, np.zeros_like(gold))
    assert math.isnan(none["rp_at_5"]) and math.isnan(none["ndcg_at_5"]) and math.isnan(none["macro_f1_present_labels"])
    assert none["n_docs_no_gold"] == 2 and none["micro_f1"] == 0.0 and none["macro_f1"] == 0.0
    assert none["macro_f1"] == f1_score(np.zeros_like(gold), scores > 0, average="macro", zero_division=0)


# ---------------------------------------------------------------------------------------------------------------------
# dtypes and non-finite logits
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    rng, scores, gold = random_case(7, n=40, n_labels=25)
    low = torch.from_numpy(scores).to(dtype)
    exact = low.float().numpy()  # the values the metric must see: upcast, not re-rounded
    if dtype == torch.bfloat16:
        assert any(len(np.unique(r)) < len(r) for r in exact)  # bf16 creates ties: tie-breaking is exercised
    unseen = rng.integers(0, 2, 40)
    m = multilabel_metrics(low, torch.from_numpy(gold), n_unseen_gold=torch.from_numpy(unseen))
    assert_matches(m, reference(exact, gold, unseen))
    assert m == multilabel_metrics(exact, gold, n_unseen_gold=unseen)


def test_tiny_logit_is_positive_and_huge_logits_do_not_overflow():
    # float32 sigmoid(1e-9) rounds to exactly 0.5; the rule is the exact logit > 0
    scores = np.array([[1e-9, -1e-9, 1e30, -1e30, 0.0]], np.float32)
    gold = np.array([[1, 0, 1, 0, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = multilabel_metrics(scores, gold)
        m64 = multilabel_metrics(np.array([[1e300, -1e300, 1e-300, -5.0, 0.0]]), np.array([[1, 0, 1, 0, 0]]))
    assert m["micro_f1"] == 1.0 and m["nonfinite_scores"] == 0
    assert m64["micro_f1"] == 1.0 and m64["precision_at_1"] == 1.0


QUALITY = KEYS - {"nonfinite_scores", "n_docs", "n_docs_no_gold", "n_unseen_gold"}


def test_nonfinite_logits_give_nan_metrics_never_a_perfect_score():
    """All-NaN (or all -inf) logits would tie to label 0 when ranked: with the gold label at index 0 that read as
    P@1 = 1. Any NaN or infinite logit makes every quality metric NaN, and the entries are counted."""
    gold = np.array([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    for bad in (np.nan, -np.inf, np.inf):
        scores = np.full((2, 5), bad, np.float32)
        m = multilabel_metrics(torch.from_numpy(scores), gold)
        assert all(math.isnan(m[k]) for k in QUALITY), (bad, m)
        assert m["nonfinite_scores"] == 10 and m["n_docs"] == 2
    one = np.array([[np.nan, 1.0, -1.0, 0.5, 2.0], [3.0, -1.0, 0.0, 0.2, -2.0]], np.float32)
    before = one.copy()
    m = multilabel_metrics(one, gold)
    np.testing.assert_array_equal(one, before)  # the caller's array untouched
    assert m["nonfinite_scores"] == 1 and all(math.isnan(m[k]) for k in QUALITY)
    assert all(math.isfinite(v) for k, v in multilabel_metrics(np.nan_to_num(one), gold).items() if k in QUALITY)


def test_threshold_other_than_half():
    _, scores, gold = random_case(8)
    cut = math.log(0.8 / 0.2)
    m = multilabel_metrics(scores, gold, threshold=0.8)
    pred = 1 / (1 + np.exp(-scores.astype(np.float64))) > 0.8
    assert m["micro_f1"] == pytest.approx(f1_score(gold, pred, average="micro", zero_division=0), abs=1e-12)
    assert_matches(m, reference(scores, gold, cut=cut))
    edge = multilabel_metrics(np.array([[1.38, 1.39]]), np.array([[0, 1]]), threshold=0.8)  # cut = 1.3863
    assert edge["micro_f1"] == 1.0


def test_input_validation_and_empty():
    s, g = np.zeros((2, 5)), np.zeros((2, 5))
    with pytest.raises(ValueError):
        multilabel_metrics(s, np.zeros((2, 4)))
    with pytest.raises(ValueError):
        multilabel_metrics(s, g, threshold=1.0)
    with pytest.raises(ValueError):
        multilabel_metrics(s, g, n_unseen_gold=np.array([1, -1]))
    with pytest.raises(ValueError):
        multilabel_metrics(s, g, n_unseen_gold=np.array([1, 2, 3]))
    with pytest.raises(ValueError):
        multilabel_metrics(np.zeros(5), np.zeros(5))
    empty = multilabel_metrics(np.zeros((0, 5), np.float32), np.zeros((0, 5)))
    assert empty["n_docs"] == 0 and math.isnan(empty["rp_at_5"]) and math.isnan(empty["precision_at_1"])

