"""Forecast each precision config's outcome from the first fraction of its training, and validate the forecast.

    dtype-bench forecast [classification|lm] --config all --preset demo ... [--forecast 0.1]
    python -m analysis.forecast validate --forecast_dir D-forecast --full_dir D [--write_model]

A forecast run is the full run's first ceil(fraction x max_steps) steps, step for step (the same schedule over
max_steps: `loop.stop_step`), with a validation evaluation at the stop; its rows go beside the full runs'
(`results.forecast_dir`). fp32_baseline is always among them: every feature is relative to its run on the same
seed, so that a predictor fitted on one task can be read on another.

Observed outcome of a config (what the forecast predicts), from its full-length runs: the verdict
(`verdicts.table`: TOST within ±2% of fp32's mean, Holm-corrected) on the experiment's primary quality metric:
`equivalent` if the verdict keeps quality (`verdicts.KEEPS_QUALITY`), `diverges` if it is `unstable` (a run
diverged or failed), `quality loss` if it is `loss`; anything else (undecided, no data) has no label and is
left out of fitting and scoring. Every run of a config carries its config's label (the question is per config;
the effective number of independent labels is the number of configs).

Features of a forecast run, each minus fp32_baseline's on the same seed, over the window (all its steps):
- `loss_gap`: the mean training loss over the logged steps of the window's second half, relative to fp32's;
- `lost_updates`: the largest (over parameter groups) mean `lost_update_frac` over the measured steps;
- `moments_lost`: the same for the second moment's `moment_update_lost_frac` (a bf16 moment that cannot decay);
- `fidelity_deficit`: the largest mean |1 - update_fidelity|.

Predictor (stated, two rules):
1. the forecast run diverged (or logged a non-finite loss): `diverges`, probability 1 (it is the full run's start,
   so the full run diverged there too);
2. otherwise P(equivalent) = sigmoid(b0 + sum_i b_i (x_i - mean_i) / scale_i), an L2-regularised (`L2`,
   `L2_INTERCEPT`) logistic model of the features above, fitted on full-length-run labels; `equivalent` if
   P >= 0.5, else `quality loss`.
The shipped coefficients (`MODEL_FILE`) are fitted on every validation config; the validation numbers are
leave-one-config-out: each config is predicted by a model fitted without any of its runs.

Baselines the forecast is scored against, on the same runs and labels:
- `val_at_stop`: equivalent (P = 1) iff the validation metric at the stop is within the margin of fp32's on the
  same seed, else P = 0 (a diverged run: 0);
- `amp_fine`: equivalent (P = 1) iff the config keeps fp32 master weights under autocast (AMP), else P = 0.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis import verdicts
from analysis.experiment_data import BASELINE, Experiment, is_number, load_experiment
from dtype_bench import precision as precision_registry
from dtype_bench.results import forecast_dir

DEFAULT_FRACTION = 0.1
FEATURES = ("loss_gap", "lost_updates", "moments_lost", "fidelity_deficit")
L2 = 1.0
"""Ridge penalty on the standardised coefficients: few configs, so the fit is held small."""
L2_INTERCEPT = 0.01
"""A small one on the intercept, so that a fit on runs of one outcome only (leave-one-config-out may leave no
other) stays finite: it then predicts that outcome for everything, with P near 1."""
CONFIDENT = 0.8
"""A recommendation needs P(equivalent) at least this."""
MODEL_FILE = Path(__file__).with_name("forecast_model.json")
RUN_MODULES = {"classification": "experiments.classification.run", "lm": "experiments.lm.run"}


def observed_outcome(kind: str) -> str | None:
    """The outcome label of a verdict kind (None: no label)."""
    if kind in verdicts.KEEPS_QUALITY:
        return "equivalent"
    return {"unstable": "diverges", "loss": "quality loss"}.get(kind)


def observed_outcomes(full: Experiment) -> dict[str, tuple[str | None, str]]:
    """config -> (outcome label, verdict text) from the full-length runs."""
    key = full.quality_metric.key
    table = verdicts.table(full, key)
    return {config: (observed_outcome(v.kind), v.label) for (config, ref), v in table.items()
            if ref == BASELINE and config != BASELINE}


def is_amp(pc_record: dict) -> bool:
    """fp32 master weights under an autocast dtype."""
    return pc_record.get("weight_dtype") == "float32" and pc_record.get("autocast_dtype") not in (None, "none")


@dataclass
class ForecastRun:
    config: str
    seed: int
    diverged: bool
    features: dict[str, float]
    """Relative to fp32_baseline's forecast run on the same seed (NaN where it has none)."""
    evidence: dict[str, str]
    """feature -> the diagnostic, group and both values it came from."""
    val_metric: float | None
    ref_val_metric: float | None
    samples_per_second: float | None
    peak_memory_gb: float | None
    wall_seconds: float | None
    origin: str | None = None
    """Where a diverged run's first non-finite value appeared, and at which step."""


def _eval_key(key: str) -> str:
    return key[4:] if key.startswith("val_") else key


def _worst_group(records: list[dict], field: str, role: str | None = None, transform=lambda v: v
                 ) -> tuple[float, str | None]:
    """The largest over groups of the mean of a per-group diagnostic over the measured steps, and that group."""
    per: dict[str, list[float]] = {}
    for r in records:
        values = r.get(field)
        if role is not None and isinstance(values, dict):
            values = values.get(role)
        if isinstance(values, dict):
            for g, v in values.items():
                if is_number(v):
                    per.setdefault(g, []).append(transform(float(v)))
    if not per:
        return 0.0, None
    group = max(per, key=lambda g: np.mean(per[g]))
    return float(np.mean(per[group])), group


def window_summary(records: list[dict], stop: int) -> tuple[dict[str, float], dict[str, str | None]]:
    """Absolute feature values of one run's training records up to step `stop`, and the group each came from."""
    window = [r for r in records if is_number(r.get("step")) and r["step"] <= stop]
    late = [float(r["loss"]) for r in window if r["step"] > stop / 2 and is_number(r.get("loss"))]
    values, groups = {"loss_gap": float(np.mean(late)) if late else math.nan}, {"loss_gap": None}
    values["lost_updates"], groups["lost_updates"] = _worst_group(window, "lost_update_frac")
    values["moments_lost"], groups["moments_lost"] = _worst_group(window, "moment_update_lost_frac", "exp_avg_sq")
    values["fidelity_deficit"], groups["fidelity_deficit"] = _worst_group(
        window, "update_fidelity", transform=lambda v: abs(1.0 - v))
    return values, groups


DIAGNOSTIC_NAMES = {"loss_gap": "training loss (2nd half of the window)", "lost_updates": "lost_update_frac",
                    "moments_lost": "moment_update_lost_frac[exp_avg_sq]", "fidelity_deficit": "|1 - update_fidelity|"}


def _origin(row: dict) -> str | None:
    if not row.get("nonfinite_origin"):
        return None
    return f"first non-finite value in {row['nonfinite_origin']} at step {row.get('nonfinite_origin_step')}"


def stop_step_of(row: dict) -> int:
    tc = row.get("train_config", {})
    fraction = tc.get("forecast") or 1.0
    return max(1, math.ceil(fraction * tc["max_steps"]))


def forecast_runs(exp: Experiment) -> list[ForecastRun]:
    """Every non-skipped forecast run but fp32_baseline's, with its features against fp32_baseline's same seed."""
    key = _eval_key(exp.quality_metric.key) if exp.quality_metric else None
    ref_rows = {r["seed"]: r for r in exp.runs(BASELINE) if r["status"] != "skipped"}

    def summary(row: dict):
        stop = stop_step_of(row)
        values, groups = window_summary(exp.training_records(row["run_id"]), stop)
        evals = [e for e in exp.eval_records(row["run_id"]) if e.get("step") == stop]
        val = evals[-1].get(key) if evals and key else None
        return values, groups, val if is_number(val) else None

    refs = {seed: summary(row) for seed, row in ref_rows.items()}
    out = []
    for row in exp.rows:
        if row["config"] == BASELINE or row["status"] == "skipped":
            continue
        values, groups, val = summary(row)
        ref = refs.get(row["seed"])
        diverged = row["status"] in ("diverged", "failed") or not math.isfinite(values["loss_gap"])
        feats, evidence = {}, {}
        for f in FEATURES:
            ref_value = ref[0][f] if ref else math.nan
            if f == "loss_gap":
                feats[f] = (values[f] - ref_value) / abs(ref_value) if ref_value else math.nan
            else:
                feats[f] = values[f] - ref_value
            where = f" in {groups[f]}" if groups[f] else ""
            evidence[f] = f"{DIAGNOSTIC_NAMES[f]}{where}: {values[f]:.4g} vs fp32 {ref_value:.4g}"
        out.append(ForecastRun(row["config"], row["seed"], diverged, feats, evidence, val,
                               ref[2] if ref else None, row.get("samples_per_second"), row.get("peak_memory_gb"),
                               row.get("wall_seconds"), _origin(row)))
    return out


# ---------------------------------------------------------------- the predictor


@dataclass
class Model:
    intercept: float
    coefficients: dict[str, float]
    mean: dict[str, float]
    scale: dict[str, float]
    fitted_on: list[str]

    def p_equivalent(self, run: ForecastRun) -> float:
        if run.diverged:
            return 0.0
        z = self.intercept + sum(self.coefficients[f] * (run.features[f] - self.mean[f]) / self.scale[f]
                                 for f in FEATURES)
        return float(1.0 / (1.0 + math.exp(-z))) if math.isfinite(z) else 0.0

    def to_record(self) -> dict:
        return {"features": list(FEATURES), "l2": L2, "l2_intercept": L2_INTERCEPT, "intercept": self.intercept,
                "coefficients": self.coefficients, "mean": self.mean, "scale": self.scale,
                "fitted_on": self.fitted_on}

    @classmethod
    def from_record(cls, record: dict) -> "Model":
        return cls(record["intercept"], record["coefficients"], record["mean"], record["scale"], record["fitted_on"])


def fit(runs: list[ForecastRun], labels: dict[str, str]) -> Model:
    """L2-regularised logistic regression (Newton's method) of `equivalent` vs not, on the non-diverged runs
    whose config has a label; features standardised by the fitting runs' mean and standard deviation."""
    used = [r for r in runs if not r.diverged and labels.get(r.config) is not None
            and all(math.isfinite(r.features[f]) for f in FEATURES)]
    if not used:
        raise ValueError("no labelled, non-diverged forecast run to fit on")
    x = np.array([[r.features[f] for f in FEATURES] for r in used])
    y = np.array([labels[r.config] == "equivalent" for r in used], dtype=float)
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0
    z = np.hstack([np.ones((len(x), 1)), (x - mean) / scale])
    penalty = np.diag([L2_INTERCEPT] + [L2] * len(FEATURES))
    w = np.zeros(z.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-z @ w))
        grad = z.T @ (p - y) + penalty @ w
        hess = z.T @ (z * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return Model(float(w[0]), dict(zip(FEATURES, map(float, w[1:]))), dict(zip(FEATURES, map(float, mean))),
                 dict(zip(FEATURES, map(float, scale))), sorted({r.config for r in used}))


def load_model(path: Path = MODEL_FILE) -> Model:
    return Model.from_record(json.loads(Path(path).read_text(encoding="utf-8")))


def predicted_outcome(p_equivalent: float, diverged: bool) -> str:
    """Rule 1, then rule 2's threshold."""
    if diverged:
        return "diverges"
    return "equivalent" if p_equivalent >= 0.5 else "quality loss"


# ---------------------------------------------------------------- validation


def baseline_val_at_stop(run: ForecastRun, margin: float = verdicts.QUALITY_MARGIN, higher_is_better: bool = True
                         ) -> float:
    if run.diverged or run.val_metric is None or run.ref_val_metric is None:
        return 0.0
    gap = (run.val_metric - run.ref_val_metric) * (1 if higher_is_better else -1)
    return 1.0 if gap >= -margin * abs(run.ref_val_metric) else 0.0


def baseline_amp_fine(run: ForecastRun, pc_records: dict[str, dict]) -> float:
    return 1.0 if is_amp(pc_records.get(run.config, {})) else 0.0


@dataclass
class Scores:
    n: int
    accuracy: float
    brier: float
    calibration: list[tuple[str, int, float, float]]
    """(bin, runs, mean predicted P(equivalent), observed frequency of equivalent)."""


BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def score(ps: list[float], ys: list[bool]) -> Scores:
    p, y = np.array(ps, dtype=float), np.array(ys, dtype=float)
    accuracy = float(((p >= 0.5) == (y == 1)).mean())
    brier = float(((p - y) ** 2).mean())
    rows = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        inside = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if inside.any():
            rows.append((f"[{lo:.1f}, {hi:.1f}{']' if hi == 1 else ')'}", int(inside.sum()),
                         float(p[inside].mean()), float(y[inside].mean())))
    return Scores(len(p), accuracy, brier, rows)


@dataclass
class Validation:
    labels: dict[str, tuple[str | None, str]]
    runs: list[ForecastRun]
    predictions: dict[str, dict[tuple[str, int], float]]
    """method -> (config, seed) -> P(equivalent); the forecast's leave-one-config-out."""
    scores: dict[str, Scores]
    model: Model
    """Fitted on every labelled config: the one to ship."""
    forecast_seconds: float
    full_seconds: float
    shipped_on: list[str]
    """The configs the `shipped` method's model was fitted on (empty without it)."""

    @property
    def beats_baselines(self) -> bool:
        f = self.scores["forecast"]
        return all(f.brier < self.scores[m].brier and f.accuracy >= self.scores[m].accuracy for m in BASELINES)


def leave_one_config_out(runs: list[ForecastRun], outcome: dict[str, str | None]) -> dict[tuple[str, int], float]:
    """(config, seed) -> P(equivalent) from a model fitted on every other config's runs."""
    out = {}
    for config in sorted({r.config for r in runs}):
        model = fit([r for r in runs if r.config != config], outcome)
        out.update({(r.config, r.seed): model.p_equivalent(r) for r in runs if r.config == config})
    return out


BASELINES = ("val_at_stop", "amp_fine")


def predictions(runs: list[ForecastRun], outcome: dict[str, str | None], pcs: dict[str, dict],
                higher_is_better: bool, shipped: Model | None = None) -> dict[str, dict[tuple[str, int], float]]:
    """method -> (config, seed) -> P(equivalent): the forecast leave-one-config-out, the two baselines, and
    `shipped` (a model fitted elsewhere, e.g. on another task: out of sample only where it saw none of these
    runs) as it is."""
    preds = {"forecast": leave_one_config_out(runs, outcome),
             "val_at_stop": {(r.config, r.seed): baseline_val_at_stop(r, higher_is_better=higher_is_better)
                             for r in runs},
             "amp_fine": {(r.config, r.seed): baseline_amp_fine(r, pcs) for r in runs}}
    if shipped is not None:
        preds["shipped"] = {(r.config, r.seed): shipped.p_equivalent(r) for r in runs}
    return preds


def validate(forecast_exp: Experiment, full_exp: Experiment, shipped: Model | None = None) -> Validation:
    labels = observed_outcomes(full_exp)
    outcome = {c: lab for c, (lab, _) in labels.items()}
    runs = [r for r in forecast_runs(forecast_exp) if outcome.get(r.config) is not None]
    preds = predictions(runs, outcome, forecast_exp.precisions(), full_exp.quality_metric.higher_is_better, shipped)
    ys = [outcome[r.config] == "equivalent" for r in runs]
    scores = {m: score([p[r.config, r.seed] for r in runs], ys) for m, p in preds.items()}
    both = ({(r["config"], r["seed"]) for r in forecast_exp.rows if r["status"] != "skipped"}
            & {(r["config"], r["seed"]) for r in full_exp.rows if r["status"] != "skipped"})
    seconds = lambda exp: sum(r.get("wall_seconds") or 0.0 for r in exp.rows if (r["config"], r["seed"]) in both)
    return Validation(labels, runs, preds, scores, fit(runs, outcome), seconds(forecast_exp), seconds(full_exp),
                      shipped.fitted_on if shipped else [])


def validation_markdown(v: Validation) -> str:
    names = {"forecast": "forecast (leave-one-config-out)", "val_at_stop": "baseline: validation metric at the stop "
             "vs fp32's (within the margin = equivalent)", "amp_fine": "baseline: every AMP config is fine",
             "shipped": f"the shipped model as fitted ({MODEL_FILE.name}: on {', '.join(v.shipped_on)})"}
    methods = [m for m in ("forecast", "val_at_stop", "amp_fine", "shipped") if m in v.predictions]
    heads = {"forecast": "forecast P(equivalent) per seed", "val_at_stop": "val-at-stop", "amp_fine": "AMP-fine",
             "shipped": "shipped model"}
    lines = ["| config | observed (full runs) | " + " | ".join(heads[m] for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for config in sorted({r.config for r in v.runs}, key=lambda c: list(precision_registry.REGISTRY).index(c)
                         if c in precision_registry.REGISTRY else 99):
        seeds = sorted(r.seed for r in v.runs if r.config == config)
        cell = lambda m: " ".join(f"{v.predictions[m][config, s]:.2f}" for s in seeds)
        lab, text = v.labels[config]
        lines.append(f"| {config} | {lab}: {text} | " + " | ".join(cell(m) for m in methods) + " |")
    unlabelled = sorted(c for c, (lab, _) in v.labels.items() if lab is None)
    if unlabelled:
        lines.append(f"\nNo label (left out): {', '.join(f'{c} ({v.labels[c][1]})' for c in unlabelled)}.")
    lines += ["", "| method | runs | accuracy | Brier |", "|---|---:|---:|---:|"]
    lines += [f"| {names[m]} | {s.n} | {s.accuracy:.3f} | {s.brier:.3f} |" for m, s in v.scores.items()]
    lines += ["", "Calibration (runs binned by predicted P(equivalent)):", "",
              "| method | bin | runs | mean predicted | observed frequency |", "|---|---|---:|---:|---:|"]
    lines += [f"| {m} | {b} | {n} | {mp:.2f} | {of:.2f} |" for m, s in v.scores.items()
              for b, n, mp, of in s.calibration]
    lines.append("")
    lines.append(f"Cost, over the (config, seed) pairs run both ways: forecast runs {v.forecast_seconds:.0f} s of "
                 f"wall time, full runs {v.full_seconds:.0f} s ({v.forecast_seconds / v.full_seconds:.0%}; each run's "
                 "`wall_seconds`, interpreter start-up not included)." if v.full_seconds else "")
    lines.append("The forecast beats both baselines (lower Brier, accuracy at least theirs)." if v.beats_baselines
                 else "**The forecast does not beat the better baseline** on these runs.")
    return "\n".join(lines)


# ---------------------------------------------------------------- the user's table


def config_forecasts(exp: Experiment, model: Model) -> list[dict]:
    """Per config (registry order): the predicted outcome, P of it, the evidence, measured speed and memory."""
    runs = forecast_runs(exp)
    out = []
    for config in exp.configs:
        if config == BASELINE:
            continue
        mine = [r for r in runs if r.config == config]
        if not mine:
            out.append({"config": config, "outcome": "not run", "p": None, "evidence": exp.runs(config)[0].get(
                "reason", "") if exp.runs(config) else ""})
            continue
        p_eq = float(np.mean([model.p_equivalent(r) for r in mine]))
        diverged = sum(r.diverged for r in mine)
        if diverged:
            outcome, p = "diverges", diverged / len(mine)
            origins = sorted({r.origin for r in mine if r.origin})
            evidence = f"diverged within the window in {diverged}/{len(mine)} seed(s)" + (
                f" ({'; '.join(origins[:2])})" if origins else "")
        else:
            outcome = predicted_outcome(p_eq, diverged=False)
            p = p_eq if outcome == "equivalent" else 1 - p_eq
            contrib = {f: abs(model.coefficients[f] * (np.mean([r.features[f] for r in mine]) - model.mean[f])
                              / model.scale[f]) for f in FEATURES}
            top = max(contrib, key=contrib.get)
            evidence = mine[0].evidence[top] + (f" (seed {mine[0].seed})" if len(mine) > 1 else "")
        mean = lambda attr: (float(np.mean([getattr(r, attr) for r in mine if is_number(getattr(r, attr))]))
                             if any(is_number(getattr(r, attr)) for r in mine) else None)
        out.append({"config": config, "outcome": outcome, "p": p, "p_equivalent": 0.0 if diverged else p_eq,
                    "evidence": evidence, "seeds": len(mine), "samples_per_second": mean("samples_per_second"),
                    "peak_memory_gb": mean("peak_memory_gb"), "amp": is_amp(exp.precision(config))})
    return out


def recommendation(rows: list[dict]) -> dict | None:
    """The cheapest (highest samples/s) config predicted equivalent with P >= CONFIDENT."""
    ok = [r for r in rows if r["outcome"] == "equivalent" and r["p"] >= CONFIDENT and r["samples_per_second"]]
    return max(ok, key=lambda r: r["samples_per_second"]) if ok else None


def caveat(model_record: dict) -> str | None:
    """The validation's own verdict on the forecast, printed with every forecast where it did not beat a baseline,
    with the shipped model's scores on other tasks (`out_of_task`: applied there as fitted) where there are any."""
    if model_record.get("beats_baselines", False):
        return None
    elsewhere = "".join(f"; as fitted, on {x}" for x in model_record.get("out_of_task", []))
    return ("caveat: on its validation (PLAN.md, 'Forecast') this forecast did NOT beat the better baseline "
            f"({model_record.get('validation_summary', 'see PLAN.md')}{elsewhere}): treat it as a hint and run the "
            "full sweep")


def forecast_table(exp: Experiment, model_path: Path = MODEL_FILE) -> str:
    record = json.loads(Path(model_path).read_text(encoding="utf-8"))
    model = Model.from_record(record)
    rows = config_forecasts(exp, model)
    lines = [f"forecast from {exp.results_dir} (fraction {_fraction(exp)} of max_steps; features vs fp32_baseline "
             "on the same seeds)", "",
             f"{'config':<26} {'predicted':<13} {'P':>5}  {'samples/s':>9} {'peak GB':>8}  evidence"]
    for r in rows:
        p = f"{r['p']:.2f}" if r["p"] is not None else "-"
        sps = f"{r['samples_per_second']:.0f}" if r.get("samples_per_second") else "-"
        mem = f"{r['peak_memory_gb']:.3f}" if r.get("peak_memory_gb") else "-"
        lines.append(f"{r['config']:<26} {r['outcome']:<13} {p:>5}  {sps:>9} {mem:>8}  {r['evidence']}")
    rec = recommendation(rows)
    lines.append("")
    if rec:
        lines.append(f"recommendation: {rec['config']} (predicted equivalent, P {rec['p']:.2f}, "
                     f"{rec['samples_per_second']:.0f} samples/s); confirm it in full: the same command with "
                     f"`run` instead of `forecast`, --config {rec['config']},{BASELINE} and --seeds 5 (no --forecast)")
    unranked = [r["config"] for r in rows if r["outcome"] == "equivalent" and r["p"] >= CONFIDENT
                and not r["samples_per_second"]]
    if unranked:  # predicted equivalent, but no speed of their dtype was measured here to rank them by
        lines.append(f"{'also' if rec else 'recommendation: none ranked by speed;'} predicted equivalent with P >= "
                     f"{CONFIDENT}, their speed not measured here (matmuls emulated, or no timed steps): "
                     f"{', '.join(unranked)}; confirm one in full with --config <it>,{BASELINE} --seeds 5 (no "
                     "--forecast), on hardware that computes its dtype to rank it by speed")
    elif not rec:
        lines.append(f"recommendation: none (no config predicted equivalent with P >= {CONFIDENT}); run the full sweep")
    done = [r for r in exp.rows if r["status"] == "completed"]
    spent = sum(r.get("wall_seconds") or 0.0 for r in exp.rows if r["status"] != "skipped")
    estimate = sum(full_run_seconds(r) for r in done)
    lines.append(f"cost: {spent:.0f} s of wall time for the forecast runs; the full runs of the completed ones would "
                 f"take ~{estimate:.0f} s (their training and evaluations scaled to max_steps, the rest as measured), "
                 f"so the forecast costs ~{spent / estimate:.0%} of them" if estimate else
                 f"cost: {spent:.0f} s of wall time for the forecast runs")
    line = caveat(record)
    if line:
        lines.append(line)
    return "\n".join(lines)


def full_run_seconds(row: dict) -> float:
    """What the full run of a completed forecast run would cost: its training time scaled to max_steps, its
    evaluation time to the full run's evaluations, the rest (set-up, calibration, test evaluation) as measured.
    Interpreter start-up is in neither."""
    tc, stop = row["train_config"], stop_step_of(row)
    measured = {**(row.get("emulated_costs") or {}), **row}  # an emulated run's time is what this sweep costs here
    train, evals = measured.get("train_wall_seconds") or 0.0, measured.get("eval_wall_seconds") or 0.0
    full_evals = math.ceil(tc["max_steps"] / tc["eval_steps"])
    per_eval = evals / max(row.get("evaluations") or 1, 1)
    return ((row.get("wall_seconds") or 0.0) - train - evals + train * tc["max_steps"] / stop
            + per_eval * full_evals)


def _fraction(exp: Experiment) -> float | None:
    fractions = {r.get("train_config", {}).get("forecast") for r in exp.rows}
    return fractions.pop() if len(fractions) == 1 else None


# ---------------------------------------------------------------- the full report's marks


def forecast_marks(full: Experiment, model_path: Path = MODEL_FILE) -> list[dict]:
    """Where forecast runs exist beside a full results directory: per config the forecast (shipped model) next to
    the measured outcome, `wrong` where they differ. The measured outcome always stands."""
    fdir = forecast_dir(full.results_dir)
    if not (fdir / "results.jsonl").exists() or not Path(model_path).exists():
        return []
    model = load_model(model_path)
    out = marks(config_forecasts(load_experiment(fdir), model), observed_outcomes(full))
    return [{**m, "in_fit": m["config"] in model.fitted_on} for m in out]


def marks(rows: list[dict], labels: dict[str, tuple[str | None, str]]) -> list[dict]:
    """Each forecast row with the measured outcome and verdict of its config, `wrong` where a labelled outcome
    differs from the forecast."""
    out = []
    for r in rows:
        if r["outcome"] == "not run" or r["config"] not in labels:
            continue
        observed, text = labels[r["config"]]
        out.append({**r, "observed": observed, "verdict": text,
                    "wrong": observed is not None and observed != r["outcome"]})
    return out


def marks_markdown(marks: list[dict]) -> str:
    lines = ["| config | forecast | P | measured (full runs) | |", "|---|---|---:|---|---|"]
    for m in marks:
        flag = "**forecast wrong**" if m["wrong"] else ("" if m["observed"] else "no label")
        fitted = " (the shipped model was fitted on this config: not a test of it)" if m.get("in_fit") else ""
        lines.append(f"| {m['config']} | {m['outcome']} | {m['p']:.2f} | {m['verdict']} | {flag}{fitted} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- command lines


def _with_defaults(argv: list[str]) -> list[str]:
    """`--forecast` defaults to DEFAULT_FRACTION, and fp32_baseline joins --config (every feature needs it)."""
    argv = list(argv)
    if not any(a == "--forecast" or a.startswith("--forecast=") for a in argv):
        argv += ["--forecast", str(DEFAULT_FRACTION)]
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            names = precision_registry.resolve_names(argv[i + 1])
            if BASELINE not in names:
                argv[i + 1] = ",".join([BASELINE, *names])
    return argv


def print_forecast(directory: str | Path, sweep_exit_code: int) -> int:
    """After run.py's forecast runs (`--forecast`, rows in `directory`): print the table; the exit code is the
    sweep's, or 1 when no run there reports a quality metric (nothing to forecast from)."""
    exp = load_experiment(directory)
    if exp.quality_metric is None:
        print(f"error: no forecast run in {directory} reports a quality metric", file=sys.stderr)
        return sweep_exit_code or 1
    print(forecast_table(exp))
    return sweep_exit_code


def forecast_command(experiment: str, argv: list[str]) -> int:
    """`dtype-bench forecast`: run.py with --forecast (default DEFAULT_FRACTION) and fp32_baseline among the
    configs; run.py trains the forecast runs and prints the table."""
    return importlib.import_module(RUN_MODULES[experiment]).main(_with_defaults(argv))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    val = sub.add_parser("validate", help="score the forecast against full runs (leave-one-config-out), beside "
                         "the baselines and the shipped model as fitted (out of sample on another task)")
    val.add_argument("--forecast_dir", required=True)
    val.add_argument("--full_dir", required=True)
    val.add_argument("--write_model", action="store_true",
                     help=f"write the model fitted on every labelled config to {MODEL_FILE}")
    table = sub.add_parser("table", help="print the forecast of a forecast results directory")
    table.add_argument("--forecast_dir", required=True)
    args = parser.parse_args(argv)
    if args.what == "table":
        print(forecast_table(load_experiment(args.forecast_dir)))
        return 0
    shipped = load_model() if MODEL_FILE.exists() and not args.write_model else None
    v = validate(load_experiment(args.forecast_dir), load_experiment(args.full_dir), shipped)
    print(validation_markdown(v))
    if args.write_model:
        s = v.scores
        summary = ", ".join(f"{m}: accuracy {x.accuracy:.2f}, Brier {x.brier:.3f}" for m, x in s.items())
        record = {**v.model.to_record(), "beats_baselines": v.beats_baselines,
                  "validation_summary": f"leave-one-config-out on {args.full_dir}, {s['forecast'].n} runs; {summary}"}
        MODEL_FILE.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {MODEL_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
