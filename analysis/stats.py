"""Statistics over seeds: means with t-intervals, paired differences, ratios to fp32, Pareto fronts, rank correlation.

NaN is never filtered: a metric that is NaN in one seed makes that config's mean NaN, and the report shows it.
Statistics use completed runs only; diverged/failed/skipped runs are counted and explained in the stability matrix.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import integrate, special, stats as scipy_stats

from analysis.experiment_data import BASELINE, Experiment, Metric, family_of, is_number

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
    """a - b over seeds: paired by seed when both configs ran >= 2 common seeds or exactly the same one (same data
    order and initialisation, so seed-to-seed noise cancels), else Welch's unpaired interval; no interval for n=1."""
    delta: float | None
    lo: float | None
    hi: float | None
    p_value: float | None
    n: int
    paired: bool

    @property
    def significant(self) -> bool:
        return self.lo is not None and (self.lo > 0 or self.hi < 0)


def _two_sample(xa: np.ndarray, xb: np.ndarray, paired: bool, alternative: str = "two-sided"):
    """scipy's paired t (`ttest_rel`) or Welch's t (`ttest_ind(equal_var=False)`) of xa - xb."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero spread: scipy answers inf/NaN, handled by callers
        if paired:
            return scipy_stats.ttest_rel(xa, xb, alternative=alternative)
        return scipy_stats.ttest_ind(xa, xb, equal_var=False, alternative=alternative)


def _interval(result, delta: float, confidence: float) -> tuple[float, float]:
    """scipy's `confidence_interval` of a t-test result; with no spread the point itself."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = result.confidence_interval(confidence_level=confidence)
    lo, hi = float(ci.low), float(ci.high)
    return (delta, delta) if math.isnan(lo) or math.isnan(hi) else (lo, hi)


def _p(result) -> float:
    """The test's p-value; 0/0 (no spread and no difference from the null value) is no evidence: 1."""
    p = float(result.pvalue)
    return 1.0 if math.isnan(p) else p


def _paired(a: dict[int, float], b: dict[int, float], common: list[int]) -> bool:
    """Seed-paired: at least 2 common seeds, or both configs ran the one same seed."""
    return len(common) >= 2 or (len(common) == 1 and set(a) == set(b))


def difference(a: dict[int, float], b: dict[int, float]) -> Difference:
    """`a`, `b`: seed -> value."""
    common = sorted(set(a) & set(b))
    paired = _paired(a, b, common)
    if paired:
        xa, xb = np.array([a[s] for s in common], dtype=float), np.array([b[s] for s in common], dtype=float)
    else:
        xa, xb = np.array(list(a.values()), dtype=float), np.array(list(b.values()), dtype=float)
    if not len(xa) or not len(xb):
        return Difference(None, None, None, None, 0, False)
    n = len(common) if paired else min(len(xa), len(xb))
    delta = float(xa.mean() - xb.mean())
    if n < 2 or not (np.all(np.isfinite(xa)) and np.all(np.isfinite(xb))):
        return Difference(delta, None, None, None, n, paired)
    result = _two_sample(xa, xb, paired)
    spread = float(np.std(xa - xb)) if paired else float(np.std(xa) + np.std(xb))
    if spread == 0:
        return Difference(delta, None, None, None, n, paired)
    lo, hi = _interval(result, delta, CONFIDENCE)
    return Difference(delta, lo, hi, _p(result), n, paired)


MIN_SEEDS = 3
"""Fewer completed seeds than this per config: no test decides anything (a verdict is always inconclusive)."""
POWER = 0.8
"""The power a suggested number of seeds is computed for."""


@dataclass(frozen=True)
class Comparison:
    """Config `a` against reference `b` over seeds, oriented so that a positive delta means `a` is better, with the
    one-sided and equivalence (TOST) tests against an equivalence margin of ±`margin`.

    scipy's paired t (`ttest_rel`) over the seeds both ran (same data order and initialisation) when there are at
    least 2, else Welch's t (`ttest_ind(equal_var=False)`) over all seeds of each. A one-sided test at level a'
    rejects exactly when the (1 - 2a') interval (`interval(a')`) excludes 0 on that side, and TOST at a' exactly
    when that interval lies inside ±margin: a verdict prints the interval at the level that decided it."""
    delta: float | None
    n: int
    """Seed pairs (paired), else the smaller group's size (Welch)."""
    paired: bool
    test: str
    p_better: float | None
    """H1: delta > 0."""
    p_worse: float | None
    """H1: delta < 0."""
    p_equivalent: float | None
    """TOST: the larger of the p-values of delta > -margin and delta < +margin."""
    p_beyond: float | None
    """The smaller of the p-values of delta < -margin and delta > +margin (a difference beyond the margin)."""
    p_below_margin: float | None
    """H1: delta < +margin (not better by the margin or more)."""
    margin: float
    spreads: tuple[float, ...] = ()
    """Standard deviation of the paired differences, or of each group (Welch): what a seed-count plan uses."""
    sizes: tuple[int, ...] = ()
    """Seed pairs (paired), else each group's size."""
    result: object = field(default=None, compare=False, repr=False)
    """scipy's two-sided t-test result, whose `confidence_interval` gives `interval`."""

    @property
    def tested(self) -> bool:
        """Enough seeds of both for a test to decide (MIN_SEEDS)."""
        return self.p_worse is not None and self.n >= MIN_SEEDS

    def interval(self, alpha: float) -> tuple[float | None, float | None]:
        """The (1 - 2 alpha) interval of delta (oriented): the one whose bounds decide the one-sided tests and TOST
        at level alpha."""
        if self.result is None:
            return None, None
        return _interval(self.result, self.delta, 1 - 2 * alpha)

    def text(self, alpha: float) -> str:
        if self.delta is None:
            return f"no values to compare (n={self.n})"
        lo, hi = self.interval(alpha)
        interval = "" if lo is None else f", {100 * (1 - 2 * alpha):.4g}% CI [{lo:+.3g}, {hi:+.3g}]"
        tests = f"{self.test}, n={self.n}" if self.n >= 2 else f"n={self.n}, no interval"
        return f"Δ {self.delta:+.3g}{interval} ({tests}; margin ±{self.margin:.3g})"

    def _se_dof(self, n: int) -> tuple[float, float]:
        """Standard error and degrees of freedom of delta with n seeds per config at the observed spread."""
        if self.paired:
            return self.spreads[0] / math.sqrt(n), n - 1.0
        va, vb = (sd ** 2 / n for sd in self.spreads)
        se = math.sqrt(va + vb)
        return se, ((va + vb) ** 2 / ((va ** 2 + vb ** 2) / (n - 1)) if se > 0 else 2.0 * (n - 1))

    def power(self, goal: str, n: int, alpha: float) -> float | None:
        """Power at level alpha with n seeds per config if the observed delta and spread were the truth: 'difference'
        = the one-sided test in the observed direction rejects (noncentral t), 'equivalence' = TOST against ±margin
        rejects (exact for the paired t: the normal mean integrated over the chi distribution of the spread).
        None without a measured spread."""
        if self.delta is None or not self.spreads or n < 2:
            return None
        se, dof = self._se_dof(n)
        critical = float(scipy_stats.t.ppf(1 - alpha, dof))
        if se == 0:
            inside = abs(self.delta) < self.margin if goal == "equivalence" else self.delta != 0
            return 1.0 if inside else 0.0
        if goal == "difference":
            return float(scipy_stats.nct.sf(critical, dof, abs(self.delta) / se))
        if self.margin <= 0:
            return 0.0

        # TOST rejects when |delta_hat| < margin - t * se_hat; se_hat / se = sqrt(X / dof), X ~ chi2(dof),
        # independent of delta_hat ~ N(delta, se^2): integrate over r = se_hat / se, up to where no room is left.
        r = np.linspace(0.0, self.margin / (critical * se), 4001)[1:] if critical > 0 else np.linspace(0, 50, 4001)[1:]
        half = np.clip(self.margin - critical * r * se, 0.0, None)
        accepted = special.ndtr((half - self.delta) / se) - special.ndtr((-half - self.delta) / se)
        density = scipy_stats.chi.pdf(r * math.sqrt(dof), dof) * math.sqrt(dof)
        value = float(integrate.trapezoid(np.clip(accepted, 0.0, None) * density, r))
        return min(1.0, max(0.0, value))

    def seeds_for_power(self, goal: str, alpha: float, power: float = POWER) -> tuple[int, float] | None:
        """(seeds per config, its power) of the smallest n >= max(n, MIN_SEEDS) with at least `power` to settle
        `goal` at level alpha, if the observed delta and spread were the truth; None when no n up to 1,000 gets
        there (equivalence with |delta| >= margin, a difference of exactly 0) or no spread was measured yet."""
        if self.delta is None or not self.spreads:
            return None
        if goal == "equivalence" and abs(self.delta) >= self.margin or goal == "difference" and self.delta == 0:
            return None
        low, high = max(self.n, MIN_SEEDS), 1000
        if (self.power(goal, high, alpha) or 0) < power:
            return None
        while low < high:  # power rises with n
            mid = (low + high) // 2
            if self.power(goal, mid, alpha) >= power:
                high = mid
            else:
                low = mid + 1
        return low, self.power(goal, low, alpha)


def compare(a: dict[int, float], b: dict[int, float], *, margin: float, higher_is_better: bool = True) -> Comparison:
    """`a`, `b`: seed -> value (finite); see Comparison."""
    sign = 1.0 if higher_is_better else -1.0
    common = sorted(set(a) & set(b))
    paired = _paired(a, b, common)
    if paired:
        xa, xb = (sign * np.array([v[s] for s in common], dtype=float) for v in (a, b))
        size, sizes = len(common), (len(common),)
    else:
        xa, xb = (sign * np.array(list(v.values()), dtype=float) for v in (a, b))
        size, sizes = min(len(xa), len(xb)), (len(xa), len(xb))
    test = "paired t" if paired else "Welch t"
    if size == 0:
        return Comparison(None, 0, False, "none", None, None, None, None, None, margin)
    delta = float(xa.mean() - xb.mean())
    if size < 2:
        return Comparison(delta, size, paired, "none", None, None, None, None, None, margin)
    spreads = (float(np.std(xa - xb, ddof=1)),) if paired else (float(xa.std(ddof=1)), float(xb.std(ddof=1)))
    # one scipy call per direction, over the null values 0, -margin, +margin (columns)
    shifted = xa[:, None] - np.array([0.0, -margin, margin])
    greater, less = (np.nan_to_num(_two_sample(shifted, np.repeat(xb[:, None], 3, axis=1), paired, alternative)
                                   .pvalue, nan=1.0).astype(float) for alternative in ("greater", "less"))
    return Comparison(
        delta, size, paired, test, p_better=float(greater[0]), p_worse=float(less[0]),
        p_equivalent=float(max(greater[1], less[2])), p_beyond=float(min(less[1], greater[2])),
        p_below_margin=float(less[2]), margin=margin, spreads=spreads, sizes=sizes,
        result=_two_sample(xa, xb, paired))


def holm(pvalues: dict, alpha: float) -> dict:
    """Holm's step-down over a family {key: p}: key -> (adjusted p, the level its step tested at). Sorted by p, the
    i-th of m is tested at alpha / (m - i + 1) while every smaller one was rejected; the adjusted p (monotone,
    capped at 1) is <= alpha exactly when the step-down rejects it. The chance of at least one false rejection in
    the family is at most alpha, whatever the dependence between the tests."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        out[key] = (running, alpha / (m - i))
    return out


def fisher_more(a: tuple[int, int], b: tuple[int, int]) -> float:
    """One-sided Fisher exact test (scipy) that `a` = (events, non-events) has a higher event rate than `b`."""
    return float(scipy_stats.fisher_exact([list(a), list(b)], alternative="greater").pvalue)


def binomial_below_half(events: int, n: int) -> float:
    """Exact binomial test (scipy) that the event rate is below 1/2."""
    return float(scipy_stats.binomtest(events, n, 0.5, alternative="less").pvalue)


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
        summary = ConfigSummary(config, family_of(record), record.get("optimizer") == "adamw_8bit", counts)
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
