"""Quality verdicts: one decision function for the report's "Which config should I use" table, the hypotheses'
quality claims and PLAN.md's decision rule.

`decide(exp, pairs, ...)` compares each (config, reference) pair on a quality metric and names what the tests
showed:

- `equivalent`: TOST puts the difference inside ±margin and no one-sided test shows a difference;
- `small_loss` / `small_gain`: TOST puts it inside ±margin *and* the one-sided test shows it (a certain loss that
  the margin tolerates, stated as one);
- `loss` / `gain`: the one-sided test shows it and TOST does not put it inside the margin;
- `unstable`: a run diverged or failed; never equivalent, and a loss is tested with the divergences counted;
- `undecided`: no test decided, with n and the seeds that would settle it at 80% power;
- `reference`, `no_data`.

Tests (scipy's paired t over shared seeds, else Welch's t; one-sided at level LEVEL, TOST = two one-sided tests)
are grouped by the claim they make (loss, gain, equivalence, beyond the margin), and each group is corrected by
Holm's step-down over every pair of the family: with m pairs, the chance that even one claim of a kind is false is at
most LEVEL. A pair whose configs have fewer than MIN_SEEDS completed seeds is in no family (it decides nothing).

Divergences are counted: a config with a diverged or failed run is never equivalent nor a gain; its loss test is
the Bonferroni union of the loss on completed runs and a one-sided Fisher exact test of (diverged, completed)
against the reference (p = 2 × the smaller; the Fisher test alone when fewer than MIN_SEEDS runs completed), and
so is the test of a difference beyond the margin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from analysis.experiment_data import BASELINE, METRIC_BY_KEY, Experiment
from analysis.stats import MIN_SEEDS, POWER, Comparison, by_seed, compare, fisher_more, holm

LEVEL = "0.05"
"""Significance level of every test (family-wise, after Holm's correction)."""
ALPHA = float(LEVEL)
QUALITY_MARGIN = 0.02
"""Equivalence margin: ±2% of the reference config's mean of the metric."""

Kind = Literal["equivalent", "small_loss", "small_gain", "loss", "gain", "unstable", "undecided", "reference",
               "no_data"]
CLAIMS = ("loss", "gain", "equivalence", "beyond")
"""The kinds of claim a pair's tests make; Holm's correction runs over the family once per kind."""
KEEPS_QUALITY = ("equivalent", "small_loss", "small_gain")
"""Verdicts that show the difference inside the margin (TOST)."""


def decision_rule(margin: float = QUALITY_MARGIN) -> str:
    """The rule in words, for the report's first screen and PLAN.md."""
    return (f"Each config is compared with its reference on seed-paired runs (scipy's paired t, Welch's t when the "
            f"seeds differ; at least {MIN_SEEDS} completed seeds each). **equivalent within ±{margin:.0%}** = a TOST "
            f"equivalence test puts the difference inside ±{margin:.0%} of the reference's mean; **small loss "
            "(gain) inside the margin** = TOST says so and a one-sided test also shows the loss (gain); **quality "
            "loss (gain)** = the one-sided test shows it and TOST does not put it inside the margin; **unstable** = "
            "a run diverged or failed: never equivalent, its loss tested with the divergences counted (the "
            "completed runs' loss or a one-sided Fisher test of divergences, Bonferroni-combined); **undecided** = "
            "no test decided, with the seeds a test would need for 80% power at the observed difference and "
            f"spread. Error control: every test at level {LEVEL}, with Holm's step-down correction per kind of "
            "claim (loss, gain, equivalence, beyond the margin) over all comparisons of the experiment, so the "
            f"chance of even one false claim of a kind in a table is at most {LEVEL}. Each verdict prints the "
            "difference with the (1 − 2α′) interval at the level α′ of the Holm step that decided it, and the "
            "Holm-adjusted p (decided when ≤ α).")


@dataclass(frozen=True)
class Verdict:
    config: str
    reference: str
    kind: Kind
    metric: str
    runs: dict[str, int]
    reference_runs: dict[str, int]
    comparison: Comparison | None = None
    reference_mean: float | None = None
    p: dict[str, float] = field(default_factory=dict)
    """Per claim kind, the raw p-value of this pair's test (divergences counted)."""
    adjusted: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per claim kind: (Holm-adjusted p, the level of its step)."""
    family: int = 0
    """Pairs in the family its tests were corrected over."""
    margin: float = QUALITY_MARGIN
    """Relative to the reference's mean."""
    reason: str = ""
    plan_alpha: float = ALPHA
    """The level a seed-count plan is made for: the first Holm step's (alpha / family size), enough for any step."""

    @property
    def settle(self) -> str | None:
        """Undecided: how many seeds would settle it (80% power at the observed difference and spread)."""
        return _settle(self.comparison, self.plan_alpha) if self.kind == "undecided" else None

    def shows(self, claim: str) -> bool:
        """The family-wise corrected test of `claim` ('loss', 'gain', 'equivalence', 'beyond') rejects at LEVEL."""
        return claim in self.adjusted and self.adjusted[claim][0] <= ALPHA

    @property
    def unstable(self) -> int:
        return self.runs["diverged"] + self.runs["failed"]

    def _relative(self, x: float) -> str:
        scale = abs(self.reference_mean or 0.0)
        return f"{x / scale:+.2%}" if scale else f"{x:+.3g}"

    def evidence(self, claim: str) -> str:
        """The difference (relative to the reference's mean) with the interval at the level of `claim`'s Holm step,
        and the Holm-adjusted p of that claim."""
        c = self.comparison
        adjusted, step = self.adjusted.get(claim, (None, ALPHA))
        fisher = (f"Fisher test of {self.runs['diverged']}/{self.runs['diverged'] + self.runs['completed']} vs "
                  f"{self.reference_runs['diverged']}/"
                  f"{self.reference_runs['diverged'] + self.reference_runs['completed']} diverged")
        if c is None or c.delta is None:
            if self.unstable and adjusted is not None:
                return f"loss with divergences counted, Holm p={adjusted:.2g} ({fisher}; no completed run to compare)"
            return "no comparison"
        lo, hi = c.interval(step)
        interval = "" if lo is None else f" [{self._relative(lo)}, {self._relative(hi)}] ({100 * (1 - 2 * step):.3g}% CI)"
        test = "TOST" if claim == "equivalence" else {"loss": "one-sided", "gain": "one-sided",
                                                      "beyond": "beyond-margin"}[claim]
        tests = f"{c.test}, n={c.n}" if c.n >= 2 else f"n={c.n}, no interval"
        if c.paired and c.n >= 2 and c.spreads and c.spreads[0] == 0:
            tests += "; the paired differences are all equal: zero spread, so the interval is a point and p its limit"
        if self.unstable and claim in ("loss", "beyond"):
            test = f"{test} with divergences counted"
            tests = f"Bonferroni of the completed runs' {c.test} (n={c.n}) and a {fisher}"
        p = "" if adjusted is None else f", {test} Holm p={adjusted:.2g}"
        return f"Δ {self._relative(c.delta)}{interval}{p} ({tests})"

    @property
    def deciding_claim(self) -> str:
        return {"equivalent": "equivalence", "small_loss": "loss", "loss": "loss", "small_gain": "gain",
                "gain": "gain", "unstable": "loss"}.get(self.kind, "equivalence")

    @property
    def label(self) -> str:
        """What the tests showed, in words."""
        c = self.comparison
        m = f"±{self.margin:.0%}"
        rel = "" if c is None or c.delta is None else self._relative(c.delta)
        if self.kind == "reference":
            return "reference"
        if self.kind == "no_data":
            return f"no verdict: {self.reason}"
        if self.kind == "equivalent":
            return f"equivalent within {m} (TOST)"
        if self.kind in ("small_loss", "small_gain"):
            return f"small {self.kind[6:]} inside the margin: {rel}, significant"
        if self.kind in ("loss", "gain"):
            beyond = f", beyond {m}" if self.shows("beyond") else ""
            return f"quality {self.kind}: {rel}{beyond}"
        if self.kind == "unstable":
            counts = f"{self.runs['diverged']} of {sum(self.runs.values()) - self.runs['skipped']} runs diverged" + (
                f", {self.runs['failed']} failed" if self.runs["failed"] else "")
            return f"unstable: {counts}" + ("; quality loss with divergences counted" if self.shows("loss") else "")
        return f"undecided (n={c.n if c else 0}; {self.settle or self.reason})"

    def text(self) -> str:
        """Label, evidence and (undecided) what would settle it: one line."""
        if self.kind in ("reference", "no_data"):
            return self.label
        return f"{self.label} — {self.evidence(self.deciding_claim)}"


def counts(exp: Experiment, config: str) -> dict[str, int]:
    out = {s: 0 for s in ("completed", "diverged", "failed", "skipped")}
    for row in exp.runs(config):
        out[row["status"]] += 1
    return out


def _raw_tests(c: Comparison | None, runs: dict, ref: dict) -> dict[str, float]:
    """Per claim kind, the pair's raw p-value, with divergences counted; a claim a pair cannot make is absent."""
    quality = c is not None and c.tested
    unstable = runs["diverged"] + runs["failed"]
    finished = (runs["diverged"], runs["completed"]), (ref["diverged"], ref["completed"])
    divergence = (fisher_more(*finished) if runs["diverged"] and min(map(sum, finished)) >= MIN_SEEDS else None)
    if not unstable:
        return {} if not quality else {"loss": c.p_worse, "gain": c.p_better, "equivalence": c.p_equivalent,
                                       "beyond": c.p_beyond}
    out = {}
    for claim, survivors in (("loss", c.p_worse if quality else None), ("beyond", c.p_beyond if quality else None)):
        parts = [p for p in (survivors, divergence) if p is not None]
        if parts:
            out[claim] = min(1.0, len(parts) * min(parts))
    return out


def _settle(c: Comparison | None, alpha: float) -> str:
    """How many seeds would settle it (80% power at the observed difference and spread, at level alpha)."""
    if c is None or c.n < 2 or not c.spreads:
        return f"at least {MIN_SEEDS} completed seeds of both configs"
    goals = ("equivalence", "difference") if abs(c.delta) < c.margin else ("difference",)
    for goal in goals:
        plan = c.seeds_for_power(goal, alpha)
        if plan:
            now = c.power(goal, max(c.n, 2), alpha)
            what = "equivalence" if goal == "equivalence" else ("the loss" if c.delta < 0 else "the gain")
            return (f"~{plan[0]} seeds per config for {POWER:.0%} power to show {what} at level {alpha:.2g} "
                    f"(power {plan[1]:.0%} there, {now:.0%} with the {c.n} now)")
    return "no number of seeds would decide it at the observed difference (0, or beyond the margin for equivalence)"


def decide(exp: Experiment, pairs: list[tuple[str, str]], key: str, *, margin: float = QUALITY_MARGIN
           ) -> dict[tuple[str, str], Verdict]:
    """The verdict of every (config, reference) pair on quality metric `key`, its tests corrected over the family of
    all `pairs` (see the module docstring)."""
    metric = METRIC_BY_KEY[key]
    prepared = {}
    for config, reference in pairs:
        runs, ref = counts(exp, config), counts(exp, reference)
        a, b = by_seed(exp.runs(config, "completed"), key), by_seed(exp.runs(reference, "completed"), key)
        finite = all(math.isfinite(v) for v in [*a.values(), *b.values()])
        mean = sum(b.values()) / len(b) if b else None
        c = (compare(a, b, margin=margin * abs(mean), higher_is_better=metric.higher_is_better)
             if a and b and finite else None)
        raw = {} if config == reference else _raw_tests(c, runs, ref)
        prepared[config, reference] = (runs, ref, c, mean, raw, a, b, finite)
    family = [pair for pair, v in prepared.items() if v[4]]
    adjusted = {pair: {} for pair in prepared}
    for claim in CLAIMS:
        members = {pair: prepared[pair][4][claim] for pair in family if claim in prepared[pair][4]}
        for pair, value in holm(members, ALPHA).items():
            adjusted[pair][claim] = value
    plan_alpha = ALPHA / max(len(family), 1)  # the first Holm step's level: enough for any step
    out = {}
    for pair, (runs, ref, c, mean, raw, a, b, finite) in prepared.items():
        config, reference = pair
        base = dict(config=config, reference=reference, metric=key, runs=runs, reference_runs=ref, comparison=c,
                    reference_mean=mean, p=raw, adjusted=adjusted[pair], family=len(family), margin=margin)
        v = Verdict(kind="undecided", **base)
        if config == reference:
            out[pair] = Verdict(kind="reference", **base)
        elif runs["diverged"] + runs["failed"]:
            out[pair] = Verdict(kind="unstable", **base)
        elif not (runs["completed"] and ref["completed"]):
            why = "no completed run" + ("" if runs["completed"] else f" of {config}") + (
                "" if ref["completed"] else f" of {reference}")
            out[pair] = Verdict(kind="no_data", reason=why, **base)
        elif not (a and b and finite):
            out[pair] = Verdict(kind="no_data", reason=f"no finite {key} in the completed runs of both", **base)
        else:
            inside = v.shows("equivalence")
            if v.shows("loss"):
                kind = "small_loss" if inside else "loss"
            elif v.shows("gain"):
                kind = "small_gain" if inside else "gain"
            else:
                kind = "equivalent" if inside else "undecided"
            out[pair] = Verdict(kind=kind, plan_alpha=plan_alpha,
                                reason="" if c.tested else f"fewer than {MIN_SEEDS} seeds", **base)
    return out


def table(exp: Experiment, key: str, extra_pairs: tuple[tuple[str, str], ...] = (), *,
          margin: float = QUALITY_MARGIN) -> dict[tuple[str, str], Verdict]:
    """The experiment's family: every config against fp32_baseline, plus `extra_pairs` (the hypotheses' quality
    comparisons against other references), decided together."""
    pairs = [(c, BASELINE) for c in exp.configs] + [p for p in extra_pairs if p[0] in exp.configs or
                                                    p[1] in exp.configs]
    return decide(exp, list(dict.fromkeys(pairs)), key, margin=margin)
