"""The study's hypotheses H1-H4, each defined once: its statement, the metric, the claims and the tests that decide
them, the margin and the level. `evaluate` decides them on the results of both experiments; the "Hypotheses"
section of experiments/classification/PLAN.md is generated from these definitions:

    python analysis/hypotheses.py --write_plan      # rewrite PLAN.md's section (a test fails when they differ)

Decision rules, for every hypothesis:
- a hypothesis is a conjunction of claims; it is `supported` when every claim is, `refuted` when any claim is,
  and `inconclusive` otherwise, with n, the interval and what would settle it;
- a claim is `supported` or `refuted` only when a test at the hypothesis's level says so, and never with fewer
  than MIN_SEEDS runs per config;
- quality claims are read off the experiment's quality verdicts (`analysis/verdicts.py`: the report's table reads
  the same ones), Holm-corrected over the experiment's comparisons and with divergences counted; "keeps/matches
  quality" is decided only by an equivalence test (TOST) against the stated margin; a missing significance is never
  read as "no difference";
- the frontier claim is Holm-corrected over the configs it is compared with.
"""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


if not __package__:  # run as a file (python analysis/hypotheses.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

from scipy import stats as scipy_stats  # noqa: E402

from analysis.experiment_data import (  # noqa: E402
    METRIC_BY_KEY, PRIMARY_QUALITY, PRIMARY_THROUGHPUT, Experiment, is_cpu_rss, is_number,
)
from analysis import verdicts  # noqa: E402
from analysis.stats import (  # noqa: E402
    MIN_SEEDS, POWER, Comparison, binomial_below_half, by_seed, compare, fisher_more, holm,
)
from analysis.verdicts import ALPHA, LEVEL, QUALITY_MARGIN  # noqa: E402

PLAN = Path(__file__).resolve().parents[1] / "experiments" / "classification" / "PLAN.md"
MAX_STATE_BYTES_RATIO = 0.3
"""H3: 8-bit AdamW keeps at most this fraction of the fp32 states' bytes (2 bytes per parameter instead of 8, plus
block-wise scales and the tensors under bitsandbytes' 4,096-element minimum, which stay fp32)."""

# Every config name the hypotheses depend on, in one place (a registry rename is a one-line change here).
FP32 = "fp32_baseline"
AMP_FP16 = "amp_fp16"
AMP_BF16 = "amp_bf16"
AMP_BF16_FP32_HEAD = "amp_bf16_fp32_head"
FP16_NAIVE = "fp16_naive"
FP16_FP32_ADAM_STATES = "fp16_fp32_adam_states"
BF16_ROUND_TO_NEAREST = "bf16_naive"
BF16_STOCHASTIC_ROUNDING = "bf16_sr_fp32_moments"
AMP_BF16_8BIT = "amp_bf16_8bit_adam"
AMP_FP16_8BIT = "amp_fp16_8bit_adam"

Outcome = Literal["supported", "refuted", "inconclusive"]
ClaimKind = Literal["worse", "equivalent", "diverges_more", "optimizer_origin", "less_memory", "on_frontier",
                    "state_bytes"]
QUALITY_CLAIMS = ("worse", "equivalent", "on_frontier")


@dataclass(frozen=True)
class Claim:
    kind: ClaimKind
    config: str
    reference: str = FP32

    def describe(self, h: Hypothesis) -> str:
        """The claim with the test that decides it, as PLAN.md states it."""
        a, b, level, margin = f"`{self.config}`", f"`{self.reference}`", h.level, f"±{h.margin:.0%}"
        paired = ("one-sided paired t-test over seeds (Welch's t when the configs ran different seeds), "
                  f"p ≤ {level}")
        verdict = (f"read off the pair's quality verdict (the decision rule above: Holm-corrected over the "
                   f"experiment's comparisons, divergences counted, margin {margin} of {b}'s mean)")
        return {
            "worse": f"{a} is worse than {b}: {verdict}; supported by a quality loss or a small loss inside the "
                     f"margin (one-sided t-test; for an unstable config, the loss with divergences counted), refuted "
                     "by equivalence (TOST) or a gain without a loss",
            "equivalent": f"{a} is equivalent to {b}: {verdict}; supported by equivalent or a small loss/gain "
                          f"inside the margin (TOST; never with a diverged or failed run), refuted by a difference "
                          f"shown beyond {margin} (one-sided t-tests, divergences counted)",
            "diverges_more": f"{a} diverges in more runs than {b}: one-sided Fisher exact test on (diverged, "
                             f"completed) counts, p ≤ {level}; refuted when {a} is shown to complete in most runs "
                             f"(exact binomial test of a divergence rate below 1/2, p ≤ {level}) or {b} to diverge "
                             "more (the opposite Fisher test)",
            "optimizer_origin": f"the mechanism: {a}'s first non-finite value appears in the optimizer update "
                                "(`nonfinite_origin` = optimizer:*) in most of its diverged runs: exact binomial "
                                f"test of that share against 1/2, p ≤ {level}; refuted by the opposite test",
            "less_memory": f"{a} needs less peak memory than {b}: {paired}; refuted by the opposite one-sided test",
            "on_frontier": f"{a} is on the throughput–quality frontier on a CUDA GPU: against every other config "
                           f"that completed, it is better in throughput or in quality ({paired}, Bonferroni over "
                           f"the two axes); refuted when another config is better in one and not worse by "
                           f"{margin} in the other (Holm-corrected over the other configs)",
            "state_bytes": f"{a} keeps at most {MAX_STATE_BYTES_RATIO}× the optimizer-state bytes of {b} "
                           "(recorded per run; deterministic, but decided only with the seeds the other claims need)",
        }[self.kind]


@dataclass(frozen=True)
class Hypothesis:
    key: str
    title: str
    statement: str
    """PLAN.md's words."""
    claims: tuple[Claim, ...]
    tasks: tuple[str, ...] = ("classification", "lm")
    """Experiments whose claims decide the verdict."""
    reported_in: tuple[str, ...] = ()
    """Experiments where the same claims are evaluated and shown beside the verdict, without deciding it."""
    metric: dict[str, str] = field(default_factory=lambda: dict(PRIMARY_QUALITY))
    """Quality metric per experiment."""
    margin: float = QUALITY_MARGIN
    level: str = LEVEL

    @property
    def alpha(self) -> float:
        return float(self.level)


HYPOTHESES: tuple[Hypothesis, ...] = (
    Hypothesis(
        "H1", "output-layer precision",
        f"The 4,271-wide head with rare positives is sensitive to low-precision logits: `{AMP_BF16_FP32_HEAD}` "
        f"matches fp32 quality where `{AMP_BF16}` loses some (macro-F1, since rare labels have the smallest logit "
        "margins). The language-modelling experiment asks whether the same holds for a 50k-wide softmax head: "
        "its result is reported beside the verdict, which rests on classification.",
        (Claim("worse", AMP_BF16), Claim("equivalent", AMP_BF16_FP32_HEAD)),
        tasks=("classification",), reported_in=("lm",), metric={"classification": "macro_f1", "lm": "val_loss"}),
    Hypothesis(
        "H2", "stability",
        f"`{FP16_NAIVE}` fails in both experiments: AdamW's second moment (grad² ≈ 1e-11) underflows below fp16's "
        "smallest subnormal and eps = 1e-8 rounds to 0, so zero-gradient elements get 0/0 = NaN in the first "
        "steps — a failure in the optimizer before any gradient overflow. So it diverges more often than "
        f"`{AMP_FP16}` (fp32 masters + loss scaling), and more often than `{FP16_FP32_ADAM_STATES}` (fp32 optimizer "
        "arithmetic over the same fp16 weights), which separates that mechanism from gradient underflow "
        "(`fp16_naive_safe_eps`, a weaker variant of the same idea, is reported in the stability matrix).",
        (Claim("diverges_more", FP16_NAIVE, AMP_FP16), Claim("diverges_more", FP16_NAIVE, FP16_FP32_ADAM_STATES),
         Claim("optimizer_origin", FP16_NAIVE))),
    Hypothesis(
        "H3", "8-bit AdamW",
        "8-bit optimizer states keep quality at this learning rate (equivalent to the same AMP config with fp32 "
        f"AdamW states) and hold at most {MAX_STATE_BYTES_RATIO}× the fp32 states' bytes (~75% saved), a large "
        "share of memory for a 125M model.",
        (Claim("equivalent", AMP_BF16_8BIT, AMP_BF16), Claim("equivalent", AMP_FP16_8BIT, AMP_FP16),
         Claim("state_bytes", AMP_BF16_8BIT, AMP_BF16), Claim("state_bytes", AMP_FP16_8BIT, AMP_FP16))),
    Hypothesis(
        "H4", "the frontier",
        f"bf16 autocast (`{AMP_BF16}`) is on the throughput–quality frontier on Ampere+ GPUs; pure bf16 with "
        f"round-to-nearest updates (`{BF16_ROUND_TO_NEAREST}`) stalls (most updates at lr 2e-5 are below bf16's "
        "resolution of the weights), so it loses quality against fp32; and stochastic rounding with moments that can "
        f"decay (`{BF16_STOCHASTIC_ROUNDING}`) recovers fp32 quality at pure-bf16 weight and gradient memory.",
        (Claim("on_frontier", AMP_BF16), Claim("worse", BF16_ROUND_TO_NEAREST),
         Claim("equivalent", BF16_STOCHASTIC_ROUNDING), Claim("less_memory", BF16_STOCHASTIC_ROUNDING))),
)


# ---------------------------------------------------------------- evaluation


def _result(outcome: Outcome, reason: str, statistic: dict | None = None, settle: str | None = None) -> dict:
    return {"outcome": outcome, "reason": reason, "statistic": statistic or {}, "settle": settle}


_counts = verdicts.counts


def _comparison_stat(c: Comparison, alpha: float) -> dict:
    lo, hi = c.interval(alpha)
    return {"test": c.test, "n": c.n, "delta": c.delta, "interval": [lo, hi], "interval_level": 1 - 2 * alpha,
            "p_better": c.p_better, "p_worse": c.p_worse, "p_equivalent": c.p_equivalent,
            "p_beyond_margin": c.p_beyond, "margin": c.margin, "text": c.text(alpha)}


def quality_pairs(key: str, task: str) -> tuple[tuple[str, str], ...]:
    """The hypotheses' quality comparisons on metric `key` in `task`, each (config, reference)."""
    return tuple((claim.config, claim.reference) for h in HYPOTHESES for claim in h.claims
                 if claim.kind in ("worse", "equivalent") and task in h.tasks + h.reported_in
                 and (h.metric.get(task) or PRIMARY_QUALITY.get(task)) == key)


def quality_family(exp: Experiment, key: str, margin: float = QUALITY_MARGIN) -> dict:
    """One experiment's quality verdicts on `key`: every config against fp32 and the hypotheses' comparisons
    against other references, decided as one family (verdicts.decide). The report's table reads the same."""
    return verdicts.table(exp, key, quality_pairs(key, exp.name), margin=margin)


def _verdict_stat(v: verdicts.Verdict) -> dict:
    c = v.comparison
    stat = {"config_runs": v.runs, "reference_runs": v.reference_runs, "metric": v.metric, "verdict": v.kind,
            "label": v.label, "family_size": v.family, "p_raw": v.p,
            "p_holm": {k: a for k, (a, _) in v.adjusted.items()},
            "holm_step_level": {k: s for k, (_, s) in v.adjusted.items()}}
    if c is not None and c.delta is not None:
        stat.update(_comparison_stat(c, v.adjusted.get(v.deciding_claim, (None, ALPHA))[1]))
    return stat


def claim_outcome(kind: ClaimKind, v: verdicts.Verdict) -> Outcome:
    """A quality claim's outcome, read off the pair's verdict (so the report's table and the claim never differ):
    'worse' is supported by a shown loss (divergences counted), refuted by equivalence or a gain without one;
    'equivalent' is supported by a difference shown inside the margin, refuted by one shown beyond it."""
    if kind == "worse":
        if v.shows("loss") and v.kind in ("loss", "small_loss", "unstable"):
            return "supported"
        return "refuted" if v.kind in ("equivalent", "small_gain", "gain") else "inconclusive"
    if v.kind in verdicts.KEEPS_QUALITY:
        return "supported"
    return "refuted" if v.shows("beyond") else "inconclusive"


def _quality_claim(exp: Experiment, h: Hypothesis, claim: Claim, key: str) -> dict:
    v = quality_family(exp, key, h.margin)[claim.config, claim.reference]
    outcome = claim_outcome(claim.kind, v)
    settle = None if outcome != "inconclusive" else (v.settle or (
        "seeds enough to show how often it diverges, or that the completed runs lose quality"
        if v.kind == "unstable" else v.reason or None))
    return _result(outcome, v.text(), _verdict_stat(v), settle)


def _divergence_claim(exp: Experiment, h: Hypothesis, claim: Claim) -> dict:
    a, b = _counts(exp, claim.config), _counts(exp, claim.reference)
    na, nb = a["diverged"] + a["completed"], b["diverged"] + b["completed"]
    stat = {"config_runs": a, "reference_runs": b,
            "diverged_at_steps": [r.get("diverged_at_step") for r in exp.runs(claim.config, "diverged")]}
    if min(na, nb) < MIN_SEEDS:
        return _result("inconclusive", f"{na} and {nb} finished runs (< {MIN_SEEDS}); failed/skipped runs do not "
                                       "count", stat, f"at least {MIN_SEEDS} finished runs of both configs")
    table = (a["diverged"], a["completed"]), (b["diverged"], b["completed"])
    p_more, p_less = fisher_more(*table), fisher_more(table[1], table[0])
    p_mostly_completes = binomial_below_half(a["diverged"], na)
    stat.update(fisher_p_more=p_more, fisher_p_less=p_less, binomial_p_rate_below_half=p_mostly_completes)
    counts = f"{a['diverged']}/{na} vs {b['diverged']}/{nb} diverged"
    if p_more <= h.alpha:
        return _result("supported", f"{counts}, Fisher p={p_more:.2g}", stat)
    if p_mostly_completes <= h.alpha:
        return _result("refuted", f"{counts}: {claim.config} completes in most runs, binomial p="
                                  f"{p_mostly_completes:.2g}", stat)
    if p_less <= h.alpha:
        return _result("refuted", f"{counts}: {claim.reference} diverges more, Fisher p={p_less:.2g}", stat)
    needed = next((n for n in range(max(na, nb), 101) if fisher_more(
        (round(n * a["diverged"] / na), n - round(n * a["diverged"] / na)),
        (round(n * b["diverged"] / nb), n - round(n * b["diverged"] / nb))) <= h.alpha), None)
    return _result("inconclusive", f"{counts}, Fisher p={p_more:.2g}", stat,
                   f"about {needed} runs per config at the observed rates" if needed else
                   "no number of runs at the observed rates (they do not differ in the claimed direction)")


def _origin_claim(exp: Experiment, h: Hypothesis, claim: Claim) -> dict:
    """The run's first non-finite value appeared in the optimizer update, in most of the config's diverged runs:
    exact binomial test of the share of runs whose recorded origin is `optimizer:*` against 1/2."""
    origins = [first_origin(exp, row) for row in exp.runs(claim.config, "diverged")]
    recorded = [o for o in origins if o]
    optimizer = sum(o.startswith("optimizer") for o in recorded)
    stat = {"origins": origins, "optimizer_first": optimizer, "with_origin": len(recorded)}
    if len(recorded) < MIN_SEEDS:
        return _result("inconclusive", f"{len(recorded)} diverged runs with a recorded origin (< {MIN_SEEDS})", stat,
                       f"at least {MIN_SEEDS} diverged runs with diagnostics on")
    p_most = float(scipy_stats.binomtest(optimizer, len(recorded), 0.5, alternative="greater").pvalue)
    p_few = binomial_below_half(optimizer, len(recorded))
    stat.update(binomial_p_optimizer_most=p_most, binomial_p_optimizer_few=p_few)
    text = f"{optimizer} of {len(recorded)} diverged runs show their first non-finite value in the optimizer update"
    if p_most <= h.alpha:
        return _result("supported", f"{text}, binomial p={p_most:.2g}", stat)
    if p_few <= h.alpha:
        return _result("refuted", f"{text}, binomial p={p_few:.2g} (mostly elsewhere: {sorted(set(recorded))})",
                       stat)
    needed = next((n for n in range(len(recorded), 101) if float(scipy_stats.binomtest(
        round(n * optimizer / len(recorded)), n, 0.5, alternative="greater").pvalue) <= h.alpha), None)
    return _result("inconclusive", f"{text}, binomial p={p_most:.2g}", stat,
                   f"about {needed} diverged runs at the observed share" if needed else
                   "no number of runs at the observed share")


def first_origin(exp: Experiment, row: dict) -> str | None:
    """Where the run's first non-finite value appeared (`optimizer:<group>`, `backward:<group>`, ...): the row's
    record, else the first step-log line naming one."""
    if row.get("nonfinite_origin"):
        return str(row["nonfinite_origin"])
    return next((str(rec["nonfinite_origin"]) for rec in exp.training_records(row.get("run_id"))
                 if rec.get("nonfinite_origin")), None)


def _memory_claim(exp: Experiment, h: Hypothesis, claim: Claim) -> dict:
    c, why = _compare(exp, claim, "peak_memory_gb", False, h.margin)
    if c is None:
        return _result("inconclusive", why, {}, f"at least {MIN_SEEDS} completed seeds of both configs")
    kinds = sorted({str(r.get("peak_memory_kind")) for config in (claim.config, claim.reference)
                    for r in exp.runs(config, "completed")})
    stat = {"metric": "peak_memory_gb", "memory_kind": kinds, **_comparison_stat(c, h.alpha)}
    if any(is_cpu_rss(k) for k in kinds):  # like throughput, the claim is about the tensors a GPU holds
        return _result("inconclusive", "peak memory measured as a CPU process's resident set, which also holds "
                                       f"compiled code and the allocator's own caches, not only tensors: "
                                       f"{c.text(h.alpha)}", stat, "runs on a CUDA GPU (the allocator's peak)")
    if not c.tested:
        return _result("inconclusive", f"n={c.n} < {MIN_SEEDS} seeds: {c.text(h.alpha)}", stat,
                       f"at least {MIN_SEEDS} completed seeds of both configs")
    if c.p_better <= h.alpha:
        return _result("supported", f"less peak memory, p={c.p_better:.2g}: {c.text(h.alpha)}", stat)
    if c.p_worse <= h.alpha:
        return _result("refuted", f"more peak memory, p={c.p_worse:.2g}: {c.text(h.alpha)}", stat)
    plan = c.seeds_for_power("difference", h.alpha)
    return _result("inconclusive", f"no significant difference: {c.text(h.alpha)}", stat,
                   f"~{plan[0]} seeds for {POWER:.0%} power" if plan else "no number of seeds at the observed mean")


def _compare(exp: Experiment, claim: Claim, key: str, higher_is_better: bool,
             relative_margin: float) -> tuple[Comparison | None, str]:
    """The comparison config vs reference on `key` over completed runs, or None and why it cannot be made."""
    a = by_seed(exp.runs(claim.config, "completed"), key)
    b = by_seed(exp.runs(claim.reference, "completed"), key)
    if not a or not b:
        return None, f"`{key}` of completed runs missing for {claim.config if not a else claim.reference}"
    bad = [c for c, v in ((claim.config, a), (claim.reference, b)) if not all(math.isfinite(x) for x in v.values())]
    if bad:
        return None, f"non-finite `{key}` in completed runs of {', '.join(bad)}"
    margin = relative_margin * abs(sum(b.values()) / len(b))
    return compare(a, b, margin=margin, higher_is_better=higher_is_better), ""


def _state_bytes(row: dict) -> float | None:
    state = (row.get("static_memory_bytes") or {}).get("optimizer_state")
    if isinstance(state, dict) and is_number(state.get("total")):
        return float(state["total"])  # the per-group entries sum to it
    if isinstance(state, dict) and state and all(is_number(v) for v in state.values()):
        return float(sum(state.values()))
    return float(state) if is_number(state) else None


def _state_bytes_claim(exp: Experiment, h: Hypothesis, claim: Claim) -> dict:
    runs = {name: [r for r in exp.runs(config, "completed")] for name, config in
            (("config", claim.config), ("reference", claim.reference))}
    values = {name: [_state_bytes(r) for r in rows] for name, rows in runs.items()}
    if any(len(v) < MIN_SEEDS for v in values.values()):
        return _result("inconclusive", f"{len(values['config'])} and {len(values['reference'])} completed runs "
                                       f"(< {MIN_SEEDS})", {}, f"at least {MIN_SEEDS} completed seeds of both")
    if any(x is None for v in values.values() for x in v):
        return _result("inconclusive", "optimizer-state bytes not recorded in the rows", {}, None)
    ratios = [x / y for x, y in zip(sorted(values["config"]), sorted(values["reference"]))]
    stat = {"ratio": max(ratios), "max_ratio": MAX_STATE_BYTES_RATIO,
            "bytes": {name: sorted(set(v)) for name, v in values.items()}}
    if max(ratios) <= MAX_STATE_BYTES_RATIO:
        return _result("supported", f"optimizer states {max(ratios):.3f}× the reference's bytes", stat)
    return _result("refuted", f"optimizer states {max(ratios):.3f}× the reference's bytes (> {MAX_STATE_BYTES_RATIO})",
                   stat)


def frontier_tests(exp: Experiment, config: str, quality_key: str, margin: float, alpha: float) -> dict:
    """`config` against every other config that completed, on quality and throughput (paired t, Welch's t when
    the seeds differ). Per other config: p_dominates = that it is better on one axis and not worse by the margin on
    the other (intersection-union: the larger p of the two parts; Bonferroni over the two ways round, 2 × the
    smaller), Holm-corrected over the other configs (false 'dominated' at most alpha), and p_beaten = that
    `config` is better on at least one axis (Bonferroni over the two axes); `config` is on the frontier when every
    p_beaten <= alpha (intersection-union: no correction needed)."""
    throughput_key = PRIMARY_THROUGHPUT.get(exp.name, "samples_per_second")
    quality = METRIC_BY_KEY[quality_key]
    per, missing = {}, []
    for other in exp.configs:
        if other == config or not exp.runs(other, "completed"):
            continue  # a config with no completed run is on no frontier
        pair = Claim("on_frontier", config, other)
        q, why_q = _compare(exp, pair, quality_key, quality.higher_is_better, margin)
        t, why_t = _compare(exp, pair, throughput_key, True, margin)
        if q is None or t is None or not (q.tested and t.tested):
            missing.append(f"{other} ({why_q or why_t or f'fewer than {MIN_SEEDS} seeds'})")
            continue
        # from `config`'s side: the other dominates when `config` is worse on one axis and below +margin on the other
        dominates = min(1.0, 2 * min(max(q.p_worse, t.p_below_margin), max(t.p_worse, q.p_below_margin)))
        per[other] = {"quality": _comparison_stat(q, alpha), "throughput": _comparison_stat(t, alpha),
                      "p_dominates": dominates, "p_beaten": min(1.0, 2 * min(q.p_better, t.p_better))}
    for other, (adjusted, step) in holm({o: v["p_dominates"] for o, v in per.items()}, alpha).items():
        per[other].update(p_dominates_holm=adjusted, holm_step_level=step)
    return {"throughput_metric": throughput_key, "quality_metric": quality_key, "against": per,
            "untested": missing}


def _frontier_claim(exp: Experiment, h: Hypothesis, claim: Claim, quality_key: str) -> dict:
    devices = sorted({str((r.get("env") or {}).get("device")) for r in exp.runs(claim.config, "completed")})
    if not devices or not all(d.startswith("cuda") for d in devices):
        return _result("inconclusive", f"throughput measured on {', '.join(devices) or 'no completed run'}: the "
                                       "claim is about CUDA GPUs", {"devices": devices}, "runs on an Ampere+ GPU")
    stat = frontier_tests(exp, claim.config, quality_key, h.margin, h.alpha)
    per = stat["against"]
    dominated_by = [o for o, v in per.items() if v["p_dominates_holm"] <= h.alpha]
    if dominated_by:
        return _result("refuted", "dominated by " + ", ".join(
            f"{o} (Holm p={per[o]['p_dominates_holm']:.2g})" for o in dominated_by), stat)
    undecided = [f"{o} (p={v['p_beaten']:.2g}; quality {v['quality']['text']}; throughput "
                 f"{v['throughput']['text']})" for o, v in per.items() if v["p_beaten"] > h.alpha]
    undecided += stat["untested"]
    if undecided:
        return _result("inconclusive", f"not shown better than: {'; '.join(undecided)}", stat,
                       f"at least {MIN_SEEDS} seeds of every config and a significant gap on one axis to each")
    if not per:
        return _result("inconclusive", "no other config completed", stat, "runs of the other configs")
    return _result("supported", f"better in throughput or quality than each of {len(per)} configs", stat)


def evaluate_claim(exp: Experiment, h: Hypothesis, claim: Claim) -> dict:
    quality_key = h.metric.get(exp.name) or PRIMARY_QUALITY.get(exp.name)
    needed = (claim.config,) if claim.kind == "optimizer_origin" else (claim.config, claim.reference)
    missing = [c for c in needed if not exp.runs(c)]
    if missing and claim.kind != "on_frontier":
        result = _result("inconclusive", f"not run: {', '.join(missing)}", {
            "config_runs": _counts(exp, claim.config), "reference_runs": _counts(exp, claim.reference)},
            f"runs of {', '.join(missing)}")
    elif claim.kind in ("worse", "equivalent"):
        result = _quality_claim(exp, h, claim, quality_key)
    elif claim.kind == "diverges_more":
        result = _divergence_claim(exp, h, claim)
    elif claim.kind == "optimizer_origin":
        result = _origin_claim(exp, h, claim)
    elif claim.kind == "less_memory":
        result = _memory_claim(exp, h, claim)
    elif claim.kind == "state_bytes":
        result = _state_bytes_claim(exp, h, claim)
    else:
        result = _frontier_claim(exp, h, claim, quality_key)
    return {"claim": claim.describe(h), **result}


def combine(outcomes: list[Outcome]) -> Outcome:
    """A conjunction: supported when every part is, refuted when any is, else inconclusive."""
    if outcomes and all(o == "supported" for o in outcomes):
        return "supported"
    return "refuted" if "refuted" in outcomes else "inconclusive"


def evaluate(h: Hypothesis, experiments: dict[str, Experiment]) -> dict:
    """The verdict on `h` from the experiments (task name -> Experiment), with every claim's test per task."""
    per_task = {}
    for task in h.tasks + h.reported_in:
        exp = experiments.get(task)
        claims = ([evaluate_claim(exp, h, claim) for claim in h.claims] if exp else
                  [{"claim": claim.describe(h), **_result("inconclusive", f"no {task} results", {}, None)}
                   for claim in h.claims])
        per_task[task] = {"verdict": combine([c["outcome"] for c in claims]), "decides": task in h.tasks,
                          "claims": claims}
    verdict = combine([per_task[t]["verdict"] for t in h.tasks])
    reasons = [f"{task}: {c['outcome']} — {c['reason']}" + (f" (would settle: {c['settle']})" if c["settle"] else "")
               for task in h.tasks for c in per_task[task]["claims"] if c["outcome"] != "supported" or
               verdict == "supported"]
    return {"verdict": verdict, "statement": h.statement, "level": h.level, "margin": h.margin,
            "metric": {t: h.metric.get(t) for t in h.tasks + h.reported_in}, "tasks": per_task,
            "reason": "; ".join(reasons)}


def evaluate_all(experiments: dict[str, Experiment]) -> dict[str, dict]:
    return {f"{h.key} {h.title}": evaluate(h, experiments) for h in HYPOTHESES}


# ---------------------------------------------------------------- PLAN.md


BEGIN = "<!-- hypotheses: generated by `python analysis/hypotheses.py --write_plan` from analysis/hypotheses.py -->"
END = "<!-- end of generated hypotheses -->"


def plan_section() -> str:
    lines = [BEGIN, "", wrap(
             f"Each hypothesis is a conjunction of claims, decided by `analysis/compare_experiments.py`: "
             f"**supported** when every claim is, **refuted** when any claim is, **inconclusive** otherwise (with "
             f"n, the interval and how many seeds would settle it at {POWER:.0%} power). A claim is supported or "
             f"refuted only when its test at level α = {LEVEL} says so, and never with fewer than {MIN_SEEDS} runs "
             "per config; quality differences are oriented so that positive = better.", ""), "",
             wrap("Quality verdicts (the report's \"Which config should I use\" table and every quality claim "
                  "below come from the same decision, `analysis/verdicts.py`): " + verdicts.decision_rule(), ""),
             ""]
    for h in HYPOTHESES:
        scope = ", ".join(h.tasks) + (f" (reported, not deciding: {', '.join(h.reported_in)})" if h.reported_in
                                      else "")
        quality = any(c.kind in QUALITY_CLAIMS for c in h.claims)
        metric = "; ".join(f"{task} `{h.metric.get(task)}`" for task in h.tasks + h.reported_in)
        tested = (f"*Decided on* {scope}" + (f"; *quality metric* {metric}; *margin* ±{h.margin:.0%} of the "
                                              "reference's mean" if quality else "") + f"; *level* {h.level}.")
        lines += [wrap(f"- **{h.key} – {h.title}.** {h.statement}", "  "), wrap(f"  {tested} Claims:", "  ")]
        lines += [wrap(f"  {i}. {claim.describe(h)}.", "     ") for i, claim in enumerate(h.claims, 1)]
    return "\n".join(lines + ["", END])


def wrap(text: str, indent: str) -> str:
    return textwrap.fill(text, width=116, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def plan_text(plan: str) -> str:
    """`plan` with its generated hypotheses section replaced by the current definitions."""
    start, end = plan.index(BEGIN), plan.index(END) + len(END)
    return plan[:start] + plan_section() + plan[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write_plan", action="store_true", help=f"rewrite the generated section of {PLAN}")
    args = parser.parse_args(argv)
    if args.write_plan:
        PLAN.write_text(plan_text(PLAN.read_text()))
        print(PLAN)
    else:
        print(plan_section())
    return 0


if __name__ == "__main__":
    sys.exit(main())
