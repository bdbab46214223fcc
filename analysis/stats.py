"""Statistics over seeds: means with t-intervals, paired differences, ratios to fp32, Pareto fronts, rank correlation.

NaN is never filtered: a metric that is NaN in one seed makes that config's mean NaN, and the report shows it.
Statistics use completed runs only; diverged/failed/skipped runs are counted and explained in the stability matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as scipy_stats

from analysis.experiment_data import BASELINE, Experiment, Metric, is_number

from dtype_bench.results import mean_std

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean over seeds with a two-sided 95% Student-t interval; lo/hi are None when n < 2."""
    mean: float | None
    std: float | None
    lo: float | None
    hi: float | None
    n: int
    values: tuple[float, ...] = ()


def estimate(values: list[float]) -> Estimate:
    mean, std, n = mean_std(values)
    if n < 2:
        return Estimate(mean, None, None, None, n, tuple(values))
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return Estimate(mean, std, mean - half, mean + half, n, tuple(values))


@dataclass(frozen=True)
class Difference:
    """a - b over seeds: paired by seed when both configs ran the same >= 2 seeds (same data order and
    initialisation, so seed-to-seed noise cancels), else Welch's unpaired interval."""
    delta: float | None
    lo: float | None
    hi: float | None
    p_value: float | None
    n: int
    paired: bool

    @property
    def significant(self) -> bool:
        return self.lo is not None and (self.lo > 0 or self.hi < 0)


def difference(a: dict[int, float], b: dict[int, float]) -> Difference:
    """`a`, `b`: seed -> value."""
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        d = np.array([a[s] - b[s] for s in common], dtype=float)
        est = estimate(list(d))
        p = float(scipy_stats.ttest_1samp(d, 0.0).pvalue) if np.all(np.isfinite(d)) and d.std() > 0 else None
        return Difference(est.mean, est.lo, est.hi, p, len(common), True)
    xa, xb = np.array(list(a.values()), dtype=float), np.array(list(b.values()), dtype=float)
    if not len(xa) or not len(xb):
        return Difference(None, None, None, None, 0, False)
    delta = float(xa.mean() - xb.mean())
    if len(xa) < 2 or len(xb) < 2:
        return Difference(delta, None, None, None, min(len(xa), len(xb)), False)
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    se = math.sqrt(va + vb)
    if se == 0 or not math.isfinite(se):
        return Difference(delta, None, None, None, min(len(xa), len(xb)), False)
    dof = (va + vb) ** 2 / (va ** 2 / (len(xa) - 1) + vb ** 2 / (len(xb) - 1))
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, dof)) * se
    p = float(scipy_stats.ttest_ind(xa, xb, equal_var=False).pvalue)
    return Difference(delta, delta - half, delta + half, p, min(len(xa), len(xb)), False)


MIN_SEEDS = 3
"""Fewer completed seeds than this per config: no test decides anything (a verdict is always inconclusive)."""


@dataclass(frozen=True)
class Comparison:
    """Config `a` against reference `b` over seeds, oriented so that a positive delta means `a` is better, with the
    one-sided and equivalence (TOST) tests at level `alpha` against an equivalence margin of ±`margin`.

    Paired t over the seeds both ran (same data order and initialisation) when there are at least 2, else Welch's
    t over all seeds of each. [lo, hi] is the (1 - 2 alpha) interval: the one whose bounds decide the one-sided
    tests (hi < 0 <=> p_worse < alpha) and TOST (-margin < lo and hi < margin <=> p_equivalent < alpha); a test
    decides when p <= alpha and both configs have at least MIN_SEEDS seeds."""
    delta: float | None
    lo: float | None
    hi: float | None
    n: int
    """Seed pairs (paired), else the smaller group's size (Welch)."""
    paired: bool
    test: str
    se: float | None
    dof: float | None
    p_better: float | None
    """H1: delta > 0."""
    p_worse: float | None
    """H1: delta < 0."""
    p_equivalent: float | None
    """TOST: the larger of the p-values of delta > -margin and delta < +margin."""
    p_beyond: float | None
    """The smaller of the p-values of delta < -margin and delta > +margin (a difference beyond the margin)."""
    margin: float
    alpha: float
    spreads: tuple[float, ...] = ()
    """Standard deviation of the paired differences, or of each group (Welch): what a seed-count plan uses."""

    def _decided(self, p: float | None) -> bool:
        return p is not None and self.n >= MIN_SEEDS and p <= self.alpha

    @property
    def better(self) -> bool:
        return self._decided(self.p_better)

    @property
    def worse(self) -> bool:
        return self._decided(self.p_worse)

    @property
    def equivalent(self) -> bool:
        return self._decided(self.p_equivalent)

    @property
    def beyond_margin(self) -> bool:
        return self._decided(self.p_beyond)

    def text(self) -> str:
        if self.delta is None:
            return f"no values to compare (n={self.n})"
        interval = "" if self.lo is None else f", {1 - 2 * self.alpha:.0%} CI [{self.lo:+.3g}, {self.hi:+.3g}]"
        return f"Δ {self.delta:+.3g}{interval} ({self.test}, n={self.n}; margin ±{self.margin:.3g})"

    def seeds_needed(self, goal: str) -> int | None:
        """Seeds per config for the (1 - 2 alpha) interval to settle `goal` ('difference': exclude 0;
        'equivalence': fit inside ±margin) if the observed delta and spread stayed as they are; None when the
        observed numbers cannot get there (equivalence with |delta| >= margin, a difference of exactly 0, or no
        spread measured yet)."""
        if self.delta is None or not self.spreads:
            return None
        room = abs(self.delta) if goal == "difference" else self.margin - abs(self.delta)
        if room <= 0:
            return None
        for n in range(max(self.n, 2), 10_001):
            se = math.sqrt(sum(sd ** 2 for sd in self.spreads) / n)
            dof = n - 1 if self.paired else 2 * (n - 1)  # Welch with equal spreads and sizes
            if float(scipy_stats.t.ppf(1 - self.alpha, dof)) * se < room:
                return max(n, MIN_SEEDS)
        return None


def _t_tail(z: float, dof: float, upper: bool) -> float:
    """P(T > z) (upper) or P(T < z) for Student's t; with no spread (z = ±inf or 0/0) the exact 0 or 1."""
    if math.isnan(z):
        return 1.0
    return float(scipy_stats.t.sf(z, dof) if upper else scipy_stats.t.cdf(z, dof))


def compare(a: dict[int, float], b: dict[int, float], *, margin: float, alpha: float,
            higher_is_better: bool = True) -> Comparison:
    """`a`, `b`: seed -> value (finite); see Comparison."""
    sign = 1.0 if higher_is_better else -1.0
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        d = sign * np.array([a[s] - b[s] for s in common], dtype=float)
        delta, sd = float(d.mean()), float(d.std(ddof=1))
        se, dof, paired, test, spreads, size = sd / math.sqrt(len(d)), len(d) - 1.0, True, "paired t", (sd,), len(d)
    else:
        xa, xb = (sign * np.array(list(v.values()), dtype=float) for v in (a, b))
        size = min(len(xa), len(xb))
        if size == 0:
            return Comparison(None, None, None, 0, False, "none", None, None, None, None, None, None, margin, alpha)
        delta = float(xa.mean() - xb.mean())
        if size < 2:
            return Comparison(delta, None, None, size, False, "none (one seed)", None, None, None, None, None, None,
                              margin, alpha)
        va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
        se = math.sqrt(va + vb)
        dof = (va + vb) ** 2 / (va ** 2 / (len(xa) - 1) + vb ** 2 / (len(xb) - 1)) if se > 0 else float(size - 1)
        paired, test, spreads = False, "Welch t", (float(xa.std(ddof=1)), float(xb.std(ddof=1)))

    def z(c: float) -> float:
        return (delta - c) / se if se > 0 else (math.inf if delta > c else -math.inf if delta < c else math.nan)

    half = float(scipy_stats.t.ppf(1 - alpha, dof)) * se
    p_above_minus, p_below_plus = _t_tail(z(-margin), dof, True), _t_tail(z(margin), dof, False)
    return Comparison(
        delta, delta - half, delta + half, size, paired, test, se, dof,
        p_better=_t_tail(z(0.0), dof, True), p_worse=_t_tail(z(0.0), dof, False),
        p_equivalent=max(p_above_minus, p_below_plus),
        p_beyond=min(_t_tail(z(-margin), dof, False), _t_tail(z(margin), dof, True)),
        margin=margin, alpha=alpha, spreads=spreads)


def by_seed(rows: list[dict], key: str) -> dict[int, float]:
    return {r["seed"]: float(r[key]) for r in rows if is_number(r.get(key))}


@dataclass
class ConfigSummary:
    config: str
    family: str
    eight_bit: bool
    status_counts: dict[str, int]
    estimates: dict[str, Estimate] = field(default_factory=dict)
    vs_baseline: dict[str, float | None] = field(default_factory=dict)
    """Per metric: ratio to fp32 (throughput, memory, time) or difference (quality); None if not computable."""
    quality_deltas: dict[str, Difference] = field(default_factory=dict)
    """Per quality metric: the seed-paired difference to fp32 with its interval."""


def relative_name(metric: Metric) -> str:
    return {"throughput": "speedup", "memory": "ratio", "time": "ratio"}.get(metric.role, "delta")


def summarize(exp: Experiment) -> list[ConfigSummary]:
    baseline_rows = exp.runs(BASELINE, "completed")
    summaries = []
    for config in exp.configs:
        record = exp.precision(config)
        counts = {s: 0 for s in ("completed", "diverged", "skipped", "failed")}
        for row in exp.runs(config):
            counts[row["status"]] += 1
        done = exp.runs(config, "completed")
        summary = ConfigSummary(config, record.get("family", "unknown"), record.get("optimizer") == "adamw_8bit", counts)
        for metric in exp.metrics:
            est = estimate([float(r[metric.key]) for r in done if is_number(r.get(metric.key))])
            summary.estimates[metric.key] = est
            base = estimate([float(r[metric.key]) for r in baseline_rows if is_number(r.get(metric.key))])
            if est.mean is None or base.mean is None:
                summary.vs_baseline[metric.key] = None
            elif metric.role == "quality":
                summary.vs_baseline[metric.key] = est.mean - base.mean
                summary.quality_deltas[metric.key] = difference(by_seed(done, metric.key),
                                                                by_seed(baseline_rows, metric.key))
            else:
                summary.vs_baseline[metric.key] = est.mean / base.mean if base.mean else None
        summaries.append(summary)
    return summaries


def oriented_value(value: float, metric: Metric) -> float:
    """Higher is better after orientation (losses and memory are negated)."""
    return value if metric.higher_is_better else -value


def pareto_front(points: dict[str, tuple[float, float]], x: Metric, y: Metric) -> tuple[list[str], dict[str, str]]:
    """Non-dominated configs among finite (x, y) means, and for each dominated config one config dominating it
    (at least as good on both axes, better on one)."""
    finite = {c: (oriented_value(px, x), oriented_value(py, y)) for c, (px, py) in points.items()
              if math.isfinite(px) and math.isfinite(py)}
    dominated_by = {}
    for c, (cx, cy) in finite.items():
        for other, (ox, oy) in finite.items():
            if other != c and ox >= cx and oy >= cy and (ox > cx or oy > cy):
                dominated_by[c] = other
                break
    front = sorted((c for c in finite if c not in dominated_by), key=lambda c: -finite[c][0])
    return front, dominated_by


def ranks(values: dict[str, float], metric: Metric) -> dict[str, float]:
    """1 = best; ties share the average rank; NaN ranks last."""
    configs = list(values)
    score = np.array([oriented_value(values[c], metric) if math.isfinite(values[c]) else -np.inf for c in configs])
    r = scipy_stats.rankdata(-score, method="average")
    return {c: float(x) for c, x in zip(configs, r)}


@dataclass(frozen=True)
class Correlation:
    rho: float | None
    p_value: float | None
    ci_lo: float | None
    ci_hi: float | None
    n_configs: int
    bootstrap_resamples: int


def spearman(a: dict[str, dict[int, float]], b: dict[str, dict[int, float]], *, resamples: int = 1000,
             seed: int = 0) -> Correlation:
    """Spearman rank correlation between configs' mean values in two tasks (a, b: config -> seed -> value), with
    the scipy p-value and a percentile bootstrap interval that resamples each config's seeds in each task."""
    configs = [c for c in a if c in b and a[c] and b[c]]
    if len(configs) < 3:
        return Correlation(None, None, None, None, len(configs), 0)
    mean_a = [np.mean(list(a[c].values())) for c in configs]
    mean_b = [np.mean(list(b[c].values())) for c in configs]
    result = scipy_stats.spearmanr(mean_a, mean_b)
    rho, p = float(result.statistic), float(result.pvalue)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(resamples):
        ra = [rng.choice(list(a[c].values()), len(a[c])).mean() for c in configs]
        rb = [rng.choice(list(b[c].values()), len(b[c])).mean() for c in configs]
        boot.append(scipy_stats.spearmanr(ra, rb).statistic)
    boot = np.array(boot, dtype=float)
    boot = boot[np.isfinite(boot)]  # resamples where one side's means tie completely have no rank correlation
    if not len(boot):
        return Correlation(rho, p, None, None, len(configs), resamples)
    lo, hi = np.percentile(boot, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return Correlation(rho, p, float(lo), float(hi), len(configs), resamples)
