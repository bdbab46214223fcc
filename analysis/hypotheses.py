"""The study's hypotheses H1-H4, each defined once: its statement, the metric, the claims and the tests that decide
them, the margin and the level. `evaluate` decides them on the results of both experiments; the "Hypotheses"
section of experiments/classification/PLAN.md is generated from these definitions:

    python analysis/hypotheses.py --write_plan      # rewrite PLAN.md's section (a test fails when they differ)

Decision rules, for every hypothesis:
- a hypothesis is a conjunction of claims; it is `supported` when every claim is, `refuted` when any claim is,
  and `inconclusive` otherwise, with n, the interval and what would settle it;
- a claim is `supported` or `refuted` only when a test at the hypothesis's level says so, and never with fewer
  than MIN_SEEDS runs per config;
- "keeps/matches quality" is decided only by an equivalence test (TOST) against the stated margin; a missing
  significance is never read as "no difference".
"""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal


if not __package__:  # run as a file (python analysis/hypotheses.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

from analysis.experiment_data import (  # noqa: E402
    METRIC_BY_KEY, PRIMARY_QUALITY, PRIMARY_THROUGHPUT, Experiment, is_cpu_rss, is_number,
)
from analysis.stats import MIN_SEEDS, Comparison, by_seed, compare  # noqa: E402

PLAN = Path(__file__).resolve().parents[1] / "experiments" / "classification" / "PLAN.md"
LEVEL = "0.05"
"""Significance level of every test (a string, so exact tests compare their exact p-value with exactly 1/20)."""
QUALITY_MARGIN = 0.02
"""Equivalence margin: ±2% of the reference config's mean of the metric."""
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
ClaimKind = Literal["worse", "equivalent", "diverges_more", "less_memory", "on_frontier", "state_bytes"]
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
        tost = f"TOST equivalence test (two one-sided t-tests at {level}) against {margin} of {b}'s mean"
        return {
            "worse": f"{a} is worse than {b}: {paired}; refuted by the {tost} without a significant loss, or by "
                     f"the opposite one-sided test",
            "equivalent": f"{a} is equivalent to {b}: the {tost}, every run completed; refuted when a one-sided "
                          f"test at {level} puts the difference beyond {margin}, or when every run diverged",
            "diverges_more": f"{a} diverges in more runs than {b}: one-sided Fisher exact test on (diverged, "
                             f"completed) counts, p ≤ {level}; refuted when {a} is shown to complete in most runs "
                             f"(exact binomial test of a divergence rate below 1/2, p ≤ {level}) or {b} to diverge "
                             "more (the opposite Fisher test)",
            "less_memory": f"{a} needs less peak memory than {b}: {paired}; refuted by the opposite one-sided test",
            "on_frontier": f"{a} is on the throughput–quality frontier on a CUDA GPU: against every other config "
                           f"that completed, it is better in throughput or in quality ({paired}); refuted when "
                           f"another config is better in one and better or equivalent ({margin}) in the other",
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
        (Claim("diverges_more", FP16_NAIVE, AMP_FP16), Claim("diverges_more", FP16_NAIVE, FP16_FP32_ADAM_STATES))),
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


def _counts(exp: Experiment, config: str) -> dict[str, int]:
    counts = {s: 0 for s in ("completed", "diverged", "failed", "skipped")}
    for row in exp.runs(config):
        counts[row["status"]] += 1
    return counts


def _comparison_stat(c: Comparison) -> dict:
    return {"test": c.test, "n": c.n, "delta": c.delta, "interval": [c.lo, c.hi],
            "interval_level": 1 - 2 * c.alpha, "p_better": c.p_better, "p_worse": c.p_worse,
            "p_equivalent": c.p_equivalent, "p_beyond_margin": c.p_beyond, "margin": c.margin, "text": c.text()}


def _settle(c: Comparison, goal: str) -> str:
    if c.n < 2 or not c.spreads:
        return f"at least {MIN_SEEDS} completed seeds of both configs"
    if goal == "equivalence" and c.margin == 0:
        return "a reference with a non-zero mean (the margin is relative to it; here it is empty)"
    n = c.seeds_needed(goal)
    if n is None:
        what = ("equivalence within the margin: the observed difference is beyond it" if goal == "equivalence"
                else "a difference: the observed difference is 0")
        return f"no number of seeds would show {what} (at the observed mean)"
    return f"about {n} seeds per config at the observed spread (now {c.n})"


def _compare(exp: Experiment, h: Hypothesis, claim: Claim, key: str, higher_is_better: bool,
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
    return compare(a, b, margin=margin, alpha=h.alpha, higher_is_better=higher_is_better), ""


def _quality_claim(exp: Experiment, h: Hypothesis, claim: Claim, key: str) -> dict:
    metric = METRIC_BY_KEY[key]
    counts, ref_counts = _counts(exp, claim.config), _counts(exp, claim.reference)
    runs = {"config_runs": counts, "reference_runs": ref_counts}
    unstable = counts["diverged"] + counts["failed"]
    if ref_counts["completed"] >= MIN_SEEDS and counts["diverged"] >= MIN_SEEDS and not counts["completed"]:
        outcome = "supported" if claim.kind == "worse" else "refuted"
        return _result(outcome, f"{claim.config} diverged in every run ({counts['diverged']}): no quality", runs)
    c, why = _compare(exp, h, claim, key, metric.higher_is_better, h.margin)
    if c is None:
        return _result("inconclusive", why, runs, f"at least {MIN_SEEDS} completed seeds of both configs")
    stat = {**runs, "metric": key, **_comparison_stat(c)}
    if c.n < MIN_SEEDS:
        return _result("inconclusive", f"n={c.n} < {MIN_SEEDS} seeds: {c.text()}", stat, _settle(c, "difference"))
    if claim.kind == "worse":
        if c.worse:
            return _result("supported", f"significantly worse, p={c.p_worse:.2g}: {c.text()}", stat)
        if c.better:
            return _result("refuted", f"significantly better, p={c.p_better:.2g}: {c.text()}", stat)
        if c.equivalent:
            return _result("refuted", f"equivalent within the margin (TOST p={c.p_equivalent:.2g}) and no "
                                      f"significant loss: {c.text()}", stat)
        return _result("inconclusive", f"neither a significant loss nor equivalence: {c.text()}", stat,
                       _settle(c, "difference"))
    if c.beyond_margin:
        return _result("refuted", f"the difference is beyond the margin, p={c.p_beyond:.2g}: {c.text()}", stat)
    if c.equivalent and not unstable:
        return _result("supported", f"equivalent, TOST p={c.p_equivalent:.2g}: {c.text()}", stat)
    if c.equivalent:
        return _result("inconclusive", f"completed runs are equivalent (TOST p={c.p_equivalent:.2g}) but {unstable} "
                                       f"run(s) diverged or failed: {c.text()}", stat,
                       "seeds enough to estimate how often it diverges")
    return _result("inconclusive", f"equivalence not shown, TOST p={c.p_equivalent:.2g}: {c.text()}", stat,
                   _settle(c, "equivalence"))


def _hypergeometric_tail(x: int, row: int, col: int, total: int) -> Fraction:
    """Exact P(X >= x) for the top-left cell of a 2x2 table with fixed margins: one-sided Fisher."""
    denominator = math.comb(total, row)
    return Fraction(sum(math.comb(col, k) * math.comb(total - col, row - k)
                        for k in range(x, min(row, col) + 1)), denominator)


def _binomial_lower_tail(x: int, n: int) -> Fraction:
    """Exact P(X <= x) for X ~ Binomial(n, 1/2)."""
    return Fraction(sum(math.comb(n, k) for k in range(x + 1)), 2 ** n)


def _divergence_claim(exp: Experiment, h: Hypothesis, claim: Claim) -> dict:
    level = Fraction(h.level)
    a, b = _counts(exp, claim.config), _counts(exp, claim.reference)
    na, nb = a["diverged"] + a["completed"], b["diverged"] + b["completed"]
    stat = {"config_runs": a, "reference_runs": b,
            "diverged_at_steps": [r.get("diverged_at_step") for r in exp.runs(claim.config, "diverged")]}
    if min(na, nb) < MIN_SEEDS:
        return _result("inconclusive", f"{na} and {nb} finished runs (< {MIN_SEEDS}); failed/skipped runs do not "
                                       "count", stat, f"at least {MIN_SEEDS} finished runs of both configs")
    diverged = a["diverged"] + b["diverged"]
    p_more = _hypergeometric_tail(a["diverged"], na, diverged, na + nb)
    p_less = _hypergeometric_tail(b["diverged"], nb, diverged, na + nb)
    p_mostly_completes = _binomial_lower_tail(a["diverged"], na)
    stat.update(fisher_p_more=float(p_more), fisher_p_less=float(p_less), binomial_p_rate_below_half=float(
        p_mostly_completes))
    counts = f"{a['diverged']}/{na} vs {b['diverged']}/{nb} diverged"
    if p_more <= level:
        return _result("supported", f"{counts}, Fisher p={float(p_more):.2g}", stat)
    if p_mostly_completes <= level:
        return _result("refuted", f"{counts}: {claim.config} completes in most runs, binomial p="
                                  f"{float(p_mostly_completes):.2g}", stat)
    if p_less <= level:
        return _result("refuted", f"{counts}: {claim.reference} diverges more, Fisher p={float(p_less):.2g}", stat)
    needed = next((n for n in range(max(na, nb), 101) if _hypergeometric_tail(
        round(n * a["diverged"] / na), n, round(n * a["diverged"] / na) + round(n * b["diverged"] / nb), 2 * n)
        <= level), None)
    return _result("inconclusive", f"{counts}, Fisher p={float(p_more):.2g}", stat,
                   f"about {needed} runs per config at the observed rates" if needed else
                   "no number of runs at the observed rates (they do not differ in the claimed direction)")


def _memory_claim(exp: Experiment, h: Hypothesis, claim: Claim) -> dict:
    c, why = _compare(exp, h, claim, "peak_memory_gb", False, h.margin)
    if c is None:
        return _result("inconclusive", why, {}, f"at least {MIN_SEEDS} completed seeds of both configs")
    kinds = sorted({str(r.get("peak_memory_kind")) for config in (claim.config, claim.reference)
                    for r in exp.runs(config, "completed")})
    stat = {"metric": "peak_memory_gb", "memory_kind": kinds, **_comparison_stat(c)}
    if any(is_cpu_rss(k) for k in kinds):  # like throughput, the claim is about the tensors a GPU holds
        return _result("inconclusive", "peak memory measured as a CPU process's resident set, which also holds "
                                       f"compiled code and the allocator's own caches, not only tensors: {c.text()}",
                       stat, "runs on a CUDA GPU (the allocator's peak)")
    if c.n < MIN_SEEDS:
        return _result("inconclusive", f"n={c.n} < {MIN_SEEDS} seeds: {c.text()}", stat, _settle(c, "difference"))
    if c.better:
        return _result("supported", f"less peak memory, p={c.p_better:.2g}: {c.text()}", stat)
    if c.worse:
        return _result("refuted", f"more peak memory, p={c.p_worse:.2g}: {c.text()}", stat)
    return _result("inconclusive", f"no significant difference: {c.text()}", stat, _settle(c, "difference"))


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


def _frontier_claim(exp: Experiment, h: Hypothesis, claim: Claim, quality_key: str) -> dict:
    throughput_key = PRIMARY_THROUGHPUT.get(exp.name, "samples_per_second")
    devices = sorted({str((r.get("env") or {}).get("device")) for r in exp.runs(claim.config, "completed")})
    if not devices or not all(d.startswith("cuda") for d in devices):
        return _result("inconclusive", f"throughput measured on {', '.join(devices) or 'no completed run'}: the "
                                       "claim is about CUDA GPUs", {"devices": devices}, "runs on an Ampere+ GPU")
    quality = METRIC_BY_KEY[quality_key]
    undecided, dominated_by, per_config = [], [], {}
    for other in exp.configs:
        if other == claim.config or not exp.runs(other, "completed"):
            continue  # a config with no completed run is on no frontier
        pair = Claim(claim.kind, claim.config, other)
        q, why_q = _compare(exp, h, pair, quality_key, quality.higher_is_better, h.margin)
        t, why_t = _compare(exp, h, pair, throughput_key, True, h.margin)
        if q is None or t is None:
            undecided.append(f"{other} ({why_q or why_t})")
            continue
        per_config[other] = {"quality": _comparison_stat(q), "throughput": _comparison_stat(t)}
        if (q.worse and (t.worse or t.equivalent)) or (t.worse and (q.worse or q.equivalent)):
            dominated_by.append(other)
        elif not (q.better or t.better):
            undecided.append(f"{other} (quality {q.text()}; {throughput_key} {t.text()})")
    stat = {"throughput_metric": throughput_key, "quality_metric": quality_key, "against": per_config}
    if dominated_by:
        return _result("refuted", f"dominated by {', '.join(dominated_by)}", stat)
    if undecided:
        return _result("inconclusive", f"not shown better than: {'; '.join(undecided)}", stat,
                       f"at least {MIN_SEEDS} seeds of every config and a significant gap on one axis to each")
    if not per_config:
        return _result("inconclusive", "no other config completed", stat, "runs of the other configs")
    return _result("supported", f"better in throughput or quality than each of {len(per_config)} configs", stat)


def evaluate_claim(exp: Experiment, h: Hypothesis, claim: Claim) -> dict:
    quality_key = h.metric.get(exp.name) or PRIMARY_QUALITY.get(exp.name)
    missing = [c for c in (claim.config, claim.reference) if not exp.runs(c)]
    if missing and claim.kind != "on_frontier":
        result = _result("inconclusive", f"not run: {', '.join(missing)}", {
            "config_runs": _counts(exp, claim.config), "reference_runs": _counts(exp, claim.reference)},
            f"runs of {', '.join(missing)}")
    elif claim.kind in ("worse", "equivalent"):
        result = _quality_claim(exp, h, claim, quality_key)
    elif claim.kind == "diverges_more":
        result = _divergence_claim(exp, h, claim)
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
             f"n, the interval and how many seeds would settle it). A claim is supported or refuted only when its "
             f"test at level α = {LEVEL} says so, and never with fewer than {MIN_SEEDS} runs per config; quality "
             "differences are seed-paired, oriented so that positive = better, and reported with their "
             f"(1 − 2α) = {1 - 2 * float(LEVEL):.0%} interval (the one that decides both one-sided tests and TOST); "
             "\"matches/keeps "
             "quality\" is decided only by an equivalence test.", ""), ""]
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
