"""Analyse one experiment's results directory: summary.csv, stability matrix, Pareto fronts, PNG plots, report.md.

    python analysis/analyze_experiment.py --results_dir results/classification
    python analysis/analyze_experiment.py --results_dir results/lm --output_dir results/lm/analysis

Works on partial results (missing configs or seeds, failed / diverged / skipped runs) and says what is missing;
malformed lines in results.jsonl or the step logs are listed in the report and on stderr.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path


if not __package__:  # run as a file (python analysis/analyze_experiment.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

from analysis import plots
from analysis.experiment_data import (
    BASELINE, METRIC_BY_KEY, SCORE_FLOOR, Experiment, Metric, devices, load_experiment, styles,
)
from analysis.report import (
    caveats, floor_flag, fmt, fmt_difference, fmt_estimate, fmt_mean_std, hypotheses_section, md_table, memory_kind,
    precision_table, setup_section,
)
from analysis import forecast, hypotheses
from analysis import verdicts
from analysis.stats import ConfigSummary, Difference, pareto_front, relative_name, summarize
from analysis.verdicts import QUALITY_MARGIN

from dtype_bench.configs import HelpFormatter
from dtype_bench.results import forecast_dir
from dtype_bench.io import (
    FolderRefused, atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text, claim_folder,
    recover_interrupted_writes,
)

DEFAULT_QUALITY_MARGIN = QUALITY_MARGIN
ANALYSIS_MARKER = "analysis.json"  # what makes an analysis folder ours to write again (io.claim_folder)


@dataclass
class Analysis:
    exp: Experiment
    summaries: list[ConfigSummary]
    fronts: dict[str, tuple[list[str], dict[str, str]]]
    """'throughput' / 'memory' -> (frontier configs, dominated config -> one config dominating it)."""
    stability: list[dict]
    plots: dict[str, Path | None]
    output_dir: Path
    quality_margin: float

    def summary(self, config: str) -> ConfigSummary | None:
        return next((s for s in self.summaries if s.config == config), None)


# ---------------------------------------------------------------- tables


def summary_csv_rows(exp: Experiment, summaries: list[ConfigSummary]) -> list[dict]:
    out = []
    for s in summaries:
        row = {"config": s.config, "family": s.family, "eight_bit_optimizer": s.eight_bit,
               "runs": sum(s.status_counts.values()), **s.status_counts,
               "missing_seeds": " ".join(map(str, exp.missing_seeds(s.config)))}
        for metric in exp.metrics:
            est = s.estimates[metric.key]
            row.update({f"{metric.key}_mean": est.mean, f"{metric.key}_std": est.std,
                        f"{metric.key}_ci95_low": est.lo, f"{metric.key}_ci95_high": est.hi, f"{metric.key}_n": est.n,
                        f"{metric.key}_{relative_name(metric)}": s.vs_baseline.get(metric.key)})
            if metric.role == "quality":
                d = s.quality_deltas.get(metric.key, Difference(None, None, None, None, 0, False))
                row.update({f"{metric.key}_delta_ci95_low": d.lo, f"{metric.key}_delta_ci95_high": d.hi,
                            f"{metric.key}_delta_p": d.p_value})
        out.append(row)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    """Numbers at full precision; empty cell = not computable (no run, or n < 2 for an interval); NaN stays 'nan'."""
    header = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else repr(v) if isinstance(v, float) else v for k, v in row.items()}
                     for row in rows)
    atomic_write_text(path, text.getvalue())


def flat_row(row: dict) -> dict:
    """A results row with nested dicts flattened to `section.key` columns (e.g. `precision.weight_dtype`,
    `train_config.max_steps`, `env.torch`); lists stay lists."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flat_row(value).items()})
        else:
            out[key] = value
    return out


def write_parquet(path: Path, rows: list[dict]) -> None:
    """One Parquet row per dict, a column per key (missing = null). A column whose values are all bools, all ints or
    all numbers gets that type (NaN kept); any other column is text, JSON for lists and mixed values."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(key) for row in rows]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, bool) for v in present):
            kind = pa.bool_()
        elif present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            kind = pa.int64()
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            kind, values = pa.float64(), [None if v is None else float(v) for v in values]
        else:
            kind = pa.string()
            values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
        columns[key] = pa.array(values, type=kind)
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def first_nonfinite_origin(exp: Experiment, row: dict) -> str | None:
    """Where the run's first non-finite value appeared: the row's record, else the first step-log line naming one."""
    if row.get("nonfinite_origin"):
        return f"{row['nonfinite_origin']} (step {row.get('nonfinite_origin_step')})"
    for rec in exp.training_records(row.get("run_id")):
        if rec.get("nonfinite_origin"):
            return f"{rec['nonfinite_origin']} (step {rec.get('step')})"
    return None


def origins_summary(exp: Experiment, config: str) -> str:
    """Where the config's diverged runs first produced a non-finite value, e.g. "; first non-finite value:
    optimizer:embeddings (step 1) in 3 of 3 diverged runs"; "" when no diverged run recorded one."""
    diverged = exp.runs(config, "diverged")
    origins = [o for o in (first_nonfinite_origin(exp, row) for row in diverged) if o]
    if not origins:
        return ""
    most = max(set(origins), key=origins.count)
    return f"; first non-finite value: {most} in {origins.count(most)} of {len(diverged)} diverged runs"


def stability_matrix(exp: Experiment) -> list[dict]:
    """One entry per run: status, the step it stopped at, why, and the stress signals of its step log."""
    out = []
    for config in exp.configs:
        for row in exp.runs(config):
            records = exp.training_records(row.get("run_id"))
            logits = [r["max_abs_logit"] for r in records if isinstance(r.get("max_abs_logit"), (int, float))]
            status = row["status"]
            detail = {
                "completed": "",
                "diverged": f"non-finite loss from step {row.get('diverged_at_step')} "
                            f"(first non-finite loss at step {row.get('first_nonfinite_step')})",
                "skipped": row.get("reason") or "no reason recorded",
                "failed": row.get("error") or "no error recorded",
            }[status]
            origin = first_nonfinite_origin(exp, row)
            out.append({
                "config": config, "seed": row["seed"], "status": status,
                "stopped_at_step": row.get("diverged_at_step") if status == "diverged" else row.get("steps"),
                "scaler_skipped_steps": row.get("skipped_steps"),
                "max_abs_logit": max(logits, key=lambda v: v if math.isfinite(v) else math.inf) if logits else None,
                "nonfinite_origin": origin, "detail": detail,
            })
    return out


def _cell(entry: dict) -> str:
    if entry["status"] == "diverged":
        return f"diverged @ {entry['stopped_at_step']}"
    return entry["status"]


def stability_markdown(exp: Experiment, stability: list[dict]) -> str:
    seeds = exp.seeds
    rows = []
    for config in exp.configs:
        entries = {e["seed"]: e for e in stability if e["config"] == config}
        logits = [e["max_abs_logit"] for e in entries.values() if e["max_abs_logit"] is not None]
        skips = [e["scaler_skipped_steps"] for e in entries.values() if e["scaler_skipped_steps"] is not None]
        rows.append([config] + [_cell(entries[s]) if s in entries else "not run" for s in seeds]
                    + [fmt(max(logits)) if logits else "-", str(sum(skips)) if skips else "-"])
    table = md_table(["config"] + [f"seed {s}" for s in seeds] + ["max |logit|", "scaler-skipped steps"], rows)
    notes = [f"- **{e['config']}** seed {e['seed']}: {e['status']} — {e['detail']}"
             + (f"; first non-finite in {e['nonfinite_origin']}" if e["nonfinite_origin"] else "")
             for e in stability if e["status"] != "completed"]
    return table + ("\n\n" + "\n".join(notes) if notes else "\n\nEvery run completed.")


# ---------------------------------------------------------------- findings


def oriented(d: Difference, metric: Metric) -> tuple[float | None, float | None, float | None]:
    """(delta, lo, hi) of a difference turned so that positive = better."""
    if d.delta is None:
        return None, None, None
    if metric.higher_is_better:
        return d.delta, d.lo, d.hi
    return -d.delta, (None if d.hi is None else -d.hi), (None if d.lo is None else -d.lo)


def quality_verdicts(analysis: Analysis) -> dict[str, verdicts.Verdict]:
    """Every config's quality verdict against fp32 on the experiment's primary quality metric, decided with the
    hypotheses' comparisons as one Holm-corrected family (`hypotheses.quality_family`): the table, the findings and
    the hypotheses read these."""
    q = analysis.exp.quality_metric
    if q is None:
        return {}
    if analysis.__dict__.get("_verdicts") is None:
        family = hypotheses.quality_family(analysis.exp, q.key, analysis.quality_margin)
        analysis.__dict__["_verdicts"] = {c: v for (c, ref), v in family.items() if ref == BASELINE}
    return analysis.__dict__["_verdicts"]


def findings(analysis: Analysis) -> list[str]:
    """Per-task recommendations, each citing the verdict and the numbers it rests on."""
    q, t = analysis.exp.quality_metric, analysis.exp.throughput_metric
    mem = METRIC_BY_KEY["peak_memory_gb"]
    if q is None or t is None or analysis.summary(BASELINE) is None:
        return ["No recommendation: needs completed fp32_baseline runs and a quality and a throughput metric."]
    verdict = quality_verdicts(analysis)
    keeps = [s for s in analysis.summaries if verdict[s.config].kind in verdicts.KEEPS_QUALITY]
    ok = [s for s in keeps if s.estimates[t.key].mean is not None]
    out = []
    unranked = [s.config for s in keeps if s not in ok]  # no speed to rank by (emulated matmuls, or none measured)
    if unranked:
        out.append(f"Shown to stay within ±{analysis.quality_margin:.0%} of fp32 but not ranked by speed (no "
                   f"{t.label} measured of their dtype here"
                   + (": matmuls emulated" if set(unranked) & set(analysis.exp.emulated_configs()) else "")
                   + f"): {', '.join(f'**{c}**' for c in unranked)}.")
    if ok:
        fastest = max(ok, key=lambda s: s.estimates[t.key].mean)
        out.append(f"Fastest config shown to stay within ±{analysis.quality_margin:.0%} of fp32: "
                   f"**{fastest.config}** — {t.label} {fmt_estimate(fastest.estimates[t.key])} "
                   f"({fmt(fastest.vs_baseline.get(t.key), 3)}× fp32); {verdict[fastest.config].text()}.")
        if mem.key in fastest.estimates:
            leanest = min((s for s in ok if s.estimates[mem.key].mean is not None),
                          key=lambda s: s.estimates[mem.key].mean, default=None)
            if leanest:
                out.append(f"Least memory among those: **{leanest.config}** — {mem.label} "
                           f"{fmt_estimate(leanest.estimates[mem.key])} ({fmt(leanest.vs_baseline.get(mem.key), 3)}× "
                           f"fp32); {verdict[leanest.config].text()}.")
    elif not unranked:
        out.append(f"No config is shown to stay within ±{analysis.quality_margin:.0%} of fp32 (see the decision "
                   "rule): nothing to recommend.")
    for config, v in verdict.items():
        if v.kind in ("loss", "unstable"):
            out.append(f"Avoid **{config}**: {v.text()}.")
    undecided = [f"{config} ({v.text()})" for config, v in verdict.items() if v.kind == "undecided"]
    if undecided:
        out.append("Undecided (no test decided): " + "; ".join(undecided) + ".")
    return out


# ---------------------------------------------------------------- the analysis and its report


def analyze(results_dir: str | Path, output_dir: str | Path | None = None, *,
            quality_margin: float = DEFAULT_QUALITY_MARGIN) -> Analysis:
    """Write the analysis of `results_dir` into `output_dir` (default RESULTS_DIR/analysis) as a whole: it is built
    in a temporary folder that replaces the previous analysis only when complete, so a killed analysis leaves the
    previous one or the new one, never a mix."""
    final = Path(output_dir or Path(results_dir) / "analysis")
    finish_interrupted_writes(final)
    with atomic_directory(final, ANALYSIS_MARKER, "written_by") as tmp:
        atomic_write_json(tmp / ANALYSIS_MARKER, {"written_by": "analysis/analyze_experiment.py",
                                                  "results_dir": str(results_dir)})
        analysis = _analyze_into(tmp, results_dir, quality_margin)
    final = final.resolve()
    return dataclasses.replace(analysis, output_dir=final,
                               plots={k: p and final / p.name for k, p in analysis.plots.items()})


def finish_interrupted_writes(folder: Path) -> None:
    """Put back or remove what a killed analysis of `folder` left beside it (only folders marked as ours)."""
    folder = claim_folder(folder, ANALYSIS_MARKER, "written_by")  # a folder not ours: refused before anything
    for done in recover_interrupted_writes(folder.parent, glob.escape(folder.name)):
        print(done)


def _analyze_into(output_dir: Path, results_dir: str | Path, quality_margin: float) -> Analysis:
    exp = load_experiment(results_dir)
    summaries = summarize(exp)
    quality, throughput, memory = exp.quality_metric, exp.throughput_metric, METRIC_BY_KEY["peak_memory_gb"]
    fronts = {}
    for name, x in (("throughput", throughput), ("memory", memory)):
        if quality and x and x in exp.metrics:
            points = {s.config: (s.estimates[x.key].mean, s.estimates[quality.key].mean) for s in summaries
                      if s.estimates[x.key].mean is not None and s.estimates[quality.key].mean is not None}
            fronts[name] = pareto_front(points, x, quality)
    summary_rows = summary_csv_rows(exp, summaries)
    write_csv(output_dir / "summary.csv", summary_rows)
    write_parquet(output_dir / "summary.parquet", summary_rows)
    write_parquet(output_dir / "runs.parquet", [flat_row(row) for row in exp.rows])
    stability = stability_matrix(exp)
    write_csv(output_dir / "stability.csv", stability)

    style = styles(exp.precisions())
    figures: dict[str, Path | None] = {
        "loss_curves": plots.loss_curves(exp, style, output_dir / "loss_curves.png"),
        "relative_to_fp32": plots.relative_bars(exp, summaries, style, throughput, memory,
                                                output_dir / "relative_to_fp32.png")
        if throughput and memory in exp.metrics else None,
        "pareto": plots.pareto(summaries, style, quality, [(METRIC_BY_KEY[x.key], fronts[n][0]) for n, x in
                                                           (("throughput", throughput), ("memory", memory)) if n in fronts],
                               quality_margin, output_dir / "pareto.png") if fronts else None,
        "grad_norm": plots.step_signal(exp, style, "grad_norm", "gradient norm heartbeat (before clipping)",
                                       "global L2 grad norm", output_dir / "grad_norm.png"),
        "max_logit": plots.step_signal(exp, style, "max_abs_logit", "max |logit| per step", "max |logit|",
                                       output_dir / "max_logit.png", reference=(65504.0, "fp16 max (65,504)")),
        "loss_scale": plots.loss_scale(exp, style, output_dir / "loss_scale.png"),
        "diagnostics": plots.diagnostics(exp, style, output_dir / "diagnostics.png"),
    }
    analysis = Analysis(exp, summaries, fronts, stability, figures, output_dir, quality_margin)
    atomic_write_text(output_dir / "report.md", render_report(analysis))
    return analysis


FIGURE_TEXT = {
    "loss_curves": ("Loss curves", "Training loss per optimizer step (mean over seeds; with more than 50 steps a centred moving average "
                    "over ~4% of them, else the raw mean with a min..max band over seeds) "
                    "and validation loss at each evaluation. Dotted verticals: divergence. Line widths fall in legend "
                    "order, so configs whose curves coincide show as nested bands of their colours."),
    "relative_to_fp32": ("Throughput and memory relative to fp32", "Bars: the config's mean / fp32_baseline's mean; "
                         "dots: single seeds. Hatched: 8-bit optimizer states."),
    "pareto": ("Quality vs throughput and vs memory", "Means; error bars span min..max over seeds (the 95% intervals "
               "are in the summary); grey band: fp32's mean ± the equivalence margin, which the quality axis always "
               "spans. Large markers: on the frontier; faded: dominated. Hollow markers: 8-bit optimizer "
               "states."),
    "grad_norm": ("Gradient-norm heartbeat", "Global gradient norm before clipping, log scale; line widths as in the "
                  "loss curves."),
    "max_logit": ("Max |logit| against the fp16 maximum", "Largest absolute logit per step, log scale; the dashed "
                  "line is fp16's largest finite value."),
    "loss_scale": ("Loss scale and skipped steps", "GradScaler's scale (logged at flush steps) and cumulative "
                   "skipped optimizer steps, for configs with dynamic loss scaling."),
    "diagnostics": ("Update fidelity and underflow", (
        "Precision diagnostics of sampled optimizer steps, per parameter group (marker). *Update fidelity*: the "
        "weight change the optimizer applied, projected on the one an fp32 AdamW computes from the same gradient and "
        "stored moments (1 = landed as computed). *Weight updates lost*: elements whose intended change was non-zero "
        "but whose stored weight did not change. *Moment updates lost* is the same for the optimizer's moments: of "
        "the elements the fp32 recurrence from the same stored value would change, the fraction whose stored "
        "moment did not move at least half-way there (rounded to nearest: did not change). Update fidelity cannot "
        "see it, because its fp32 reference starts from the stored moments: a bf16 second moment rounded to "
        "nearest with beta2 = 0.999 changes by at most 0.1% per step, below bf16's half-ulp (0.2%), so it stops "
        "decaying when gradients shrink and later updates come out too small. 8-bit states are read dequantized: "
        "a block decays together with its scale, but an element whose own change is below the code spacing keeps "
        "its code. It is 0 for fp32 moments. *Parameter gradients*: zero or subnormal elements as the optimizer sees "
        "them, with structurally zero rows (embedding rows of tokens absent from the batch, unused positions) "
        "left out; under autocast these are fp32 master gradients. *Activation gradients*: the gradients entering "
        "each matmul layer during backward, in their own dtype with the loss scale applied, below the dtype's "
        "smallest normal (subnormal or flushed to zero), and the part flushed to zero; under fp16 autocast this is "
        "the underflow loss scaling exists for: compare amp_fp16 with amp_fp16_no_loss_scaling. A row (feature "
        "vector, or a parameter row) that is zero throughout counts as structural in the run's own fractions, so "
        "a row that flushed entirely is not counted there: they are lower bounds. The panel *whole rows included* "
        "corrects that against the fp32 baseline of the same seed at the same step (same batches; fp32 flushes "
        "nothing at these magnitudes): zeros inside live rows plus the rows zero here but not in fp32, over fp32's "
        "non-structural elements.")),
}
NOT_DRAWN = {
    "loss_curves": "no step log holds a training loss",
    "relative_to_fp32": "no completed fp32_baseline run to compare with",
    "pareto": "no config has both a quality and a throughput/memory mean",
    "grad_norm": "no step log holds grad_norm",
    "max_logit": "no step log holds max_abs_logit",
    "loss_scale": "no config in these results uses dynamic loss scaling (or none logged a scale)",
    "diagnostics": "no step log holds any of the diagnostics fields (update_fidelity, lost_update_frac, ...)",
}


def error_control(analysis: Analysis) -> str:
    """The first screen's statement of the decision rule and the error control it applies."""
    verdict = quality_verdicts(analysis)
    family = max((v.family for v in verdict.values()), default=0)
    return (f"Decision rule and error control: {verdicts.decision_rule(analysis.quality_margin)} Here: {family} "
            f"comparisons in the family ({analysis.exp.quality_metric.label if analysis.exp.quality_metric else '-'}"
            "; every config against fp32 and the hypotheses' comparisons against other references).")


def which_config(analysis: Analysis) -> list[str]:
    """The report's first screen: per config, the verdict and the test that decided it (the difference with the
    interval at its Holm step's level, the Holm-adjusted p), samples/s and memory relative to fp32, how its runs
    ended, best first; the decision rule and error control; links to the plots."""
    exp = analysis.exp
    q, t, mem = exp.quality_metric, exp.throughput_metric, METRIC_BY_KEY["peak_memory_gb"]
    verdict = quality_verdicts(analysis)
    speed = {s.config: s.vs_baseline.get(t.key) if t else None for s in analysis.summaries}
    shown_within = verdicts.KEEPS_QUALITY + ("reference",)
    order = sorted(analysis.summaries, key=lambda s: (
        not (s.config in verdict and verdict[s.config].kind in shown_within), -(speed[s.config] or 0)))
    rows = []
    for s in order:
        v = verdict.get(s.config)
        runs = sum(s.status_counts.values())
        stability = f"{s.status_counts['completed']}/{runs} completed" + "".join(
            f", {n} {k}" for k, n in s.status_counts.items() if n and k != "completed")
        if v is None:
            label, evidence = "no verdict", "-"
        elif not s.status_counts["completed"] and s.status_counts["skipped"] and not v.unstable:
            label, evidence = f"not run here: {skip_summary(exp, s.config)}", "-"
        else:
            label = v.label + (floor_flag(q, s.estimates[q.key].mean) if q else "")
            evidence = "reference" if v.kind == "reference" else (
                v.evidence(v.deciding_claim) if v.comparison is not None and v.comparison.delta is not None
                or v.unstable else "-")
            if v.unstable:
                evidence += origins_summary(exp, s.config)
        rows.append([s.config, label, evidence, fmt(speed[s.config], 3),
                     fmt(s.vs_baseline.get(mem.key), 3) if mem in exp.metrics else "-", stability])
    header = ["config", "verdict", f"Δ{q.label if q else 'quality'} vs fp32 (of fp32's mean) [interval at the "
              "deciding Holm step], Holm-adjusted p", f"{t.label if t else 'throughput'} ÷ fp32",
              "peak memory ÷ fp32", "stability"]
    plots_line = ", ".join(f"[{FIGURE_TEXT[k][0].lower()}]({p.name})" for k, p in analysis.plots.items() if p)
    return ["## Which config should I use", "",
            "Best first: configs shown within the margin, fastest first. " + (findings(analysis)[0] if q and t else ""),
            "", md_table(header, rows), "", error_control(analysis) if q else "No quality metric: no verdicts.", "",
            "Details: Summary, Stability (below the plots). Plots: " + (plots_line or "none drawn") + ".", ""]


def main_table(analysis: Analysis) -> str:
    exp = analysis.exp
    q, t, mem = exp.quality_metric, exp.throughput_metric, METRIC_BY_KEY["peak_memory_gb"]
    header = ["config", "family", "runs"]
    if t:
        header += [f"{t.label} mean ± std [95% CI]", "speed-up"]
    if mem in exp.metrics:
        header += [f"{mem.label} mean ± std [95% CI]", "memory ratio"]
    if q:
        header += [f"{q.label} mean ± std [95% CI]", f"Δ{q.label} vs fp32 [95% CI]"]
    rows = []
    for s in analysis.summaries:
        runs = ", ".join(f"{n} {k}" for k, n in s.status_counts.items() if n)
        row = [s.config, s.family + (" 8-bit" if s.eight_bit else ""), runs]
        if t:
            row += [fmt_estimate(s.estimates[t.key]), fmt(s.vs_baseline.get(t.key), 3)]
        if mem in exp.metrics:
            row += [fmt_estimate(s.estimates[mem.key]), fmt(s.vs_baseline.get(mem.key), 3)]
        if q:
            d = s.quality_deltas.get(q.key)
            row += [fmt_estimate(s.estimates[q.key]) + floor_flag(q, s.estimates[q.key].mean),
                    "reference" if s.config == BASELINE else fmt_difference(d) if d else "-"]
        rows.append(row)
    return md_table(header, rows)


def quality_table(analysis: Analysis) -> str:
    quality = [m for m in analysis.exp.metrics if m.role == "quality"]
    rows = [[s.config] + [fmt_mean_std(s.estimates[m.key]) + floor_flag(m, s.estimates[m.key].mean) for m in quality]
            for s in analysis.summaries]
    return md_table(["config"] + [m.label for m in quality], rows)


def runs_table(exp: Experiment) -> str:
    """Every run's metrics; an emulated run's speed and memory marked as the emulation's."""
    metrics = exp.metrics

    def cell(row: dict, key: str) -> str:
        emulated = row.get("emulated_costs") or {}
        return fmt(row[key]) if key in row else f"{fmt(emulated[key])} (emulated)" if key in emulated else "-"

    rows = [[r["config"], str(r["seed"]), r["status"]] + [cell(r, m.key) for m in metrics]
            for c in exp.configs for r in exp.runs(c)]
    return md_table(["config", "seed", "status"] + [m.label for m in metrics], rows)


FIRST_PLOTS = ("relative_to_fp32", "pareto", "loss_curves")  # on the first screen, after the decision table


def skip_summary(exp: Experiment, config: str) -> str:
    """Why a config's runs were skipped, from their rows' `reason` (the first run's; its remedy clause dropped),
    e.g. "float16 matmuls measured 42.4x slower than float32 on this CPU (emulated, ...), above --max_cpu_slowdown 4"."""
    reasons = [r.get("reason") for r in exp.runs(config, "skipped")]
    return (reasons[0] or "no reason recorded").split("; pass ")[0] if reasons else "no run"


def device_note(exp: Experiment) -> str | None:
    """What the speed and memory numbers are of, when that is not a GPU: read before comparing them, and which
    configs this CPU did not run (every run of theirs skipped), said before the table that lists them."""
    if devices(exp) != {"cpu"}:
        return None
    not_run = [c for c in exp.configs if exp.runs(c) and len(exp.runs(c, "skipped")) == len(exp.runs(c))]
    missing = (f" Not run on this CPU: {', '.join(f'`{c}`' for c in not_run)} ({skip_summary(exp, not_run[0])}); "
               "their verdicts need a machine that computes that dtype natively." if not_run else "")
    emulated = exp.emulated_configs()
    emulation = (f" Matmuls emulated in fp32 (`--emulate_slow_matmuls`, this CPU has no native ones) for "
                 f"{', '.join(f'`{c}`' for c in emulated)}: their quality is that of their dtype (the same GEMM "
                 "numerics, fp32 accumulation); their speed and memory are the emulation's and are not compared."
                 if emulated else "")
    return ("**Measured on a CPU**: speed and memory ratios say how these configs run on this CPU, nothing about a "
            "GPU; the quality verdicts carry over." + missing + emulation)


def render_report(analysis: Analysis) -> str:
    """The decision table and the plots first; the details a reader looks up (summary, stability, hypotheses,
    what is missing, setup, every run) after them."""
    exp = analysis.exp
    q = exp.quality_metric
    lines = [f"# dtype-bench: {exp.name} experiment", "",
             f"From `{exp.results_dir / 'results.jsonl'}`: {len(exp.rows)} runs of {len(exp.configs)} configs "
             f"(seeds {', '.join(map(str, exp.seeds)) or '-'}). Per-config numbers: `summary.csv`; per-run stability: "
             "`stability.csv` (also as Parquet: `summary.parquet`, one row per run in `runs.parquet`).", ""]
    if device_note(exp):
        lines += [device_note(exp), ""]
    if exp.problems:
        lines += [f"**{len(exp.problems)} note(s) on the results** (malformed lines left out, runs recorded more than "
                  "once): see What is missing or malformed.", ""]
    lines += which_config(analysis)
    lines += _plot_sections(analysis, FIRST_PLOTS)
    lines += ["## Summary", "",
              "Mean ± standard deviation over completed seeds, with the 95% Student-t interval of the mean; speed-up "
              "and memory ratio are relative to fp32_baseline's mean; the quality difference to fp32 is paired by seed "
              "(same data order and initialisation). `-`: not computable (no completed run, or one seed for an "
              "interval); `NaN`: the runs produced NaN.", "",
              main_table(analysis), "", "All quality metrics (mean ± std over completed seeds; a score below "
              f"{SCORE_FLOOR:g} is flagged as near its floor, where differences say little):", "",
              quality_table(analysis), "",
              "## Stability", "", stability_markdown(exp, analysis.stability), ""]
    lines += ["## Pareto frontier", ""]
    for name, (front, dominated_by) in analysis.fronts.items():
        x = exp.throughput_metric if name == "throughput" else METRIC_BY_KEY["peak_memory_gb"]
        lines.append(f"- **{q.label} vs {x.label}**: frontier {', '.join(front) or '-'}; dominated: "
                     + (", ".join(f"{c} (by {o})" for c, o in dominated_by.items()) or "none"))
    if not analysis.fronts:
        lines.append("No frontier: no config has a finite quality and throughput/memory mean.")
    lines += ["", "## What to use", ""] + [f"- {f}" for f in findings(analysis)] + [""]
    marks = forecast.forecast_marks(exp)
    if marks:
        lines += ["## Forecast vs measured", "", f"The forecast of `{forecast_dir(exp.results_dir)}` (its first "
                  "fraction of training, `dtype-bench forecast`) beside the verdict of the full runs above, which "
                  "stands; **forecast wrong** marks where they differ.", "", forecast.marks_markdown(marks), ""]
    lines += _plot_sections(analysis, [k for k in analysis.plots if k not in FIRST_PLOTS], heading="## More plots")
    lines += hypotheses_section(hypotheses.evaluate_all({exp.name: exp}),
                                f"this {exp.name} experiment alone (a hypothesis that another experiment decides "
                                "too reads inconclusive here; `analysis/compare_experiments.py` decides it on both)",
                                shown_tasks=(exp.name,))
    missing = exp.missing_configs()
    gaps = [f"{c}: seeds {', '.join(map(str, exp.missing_seeds(c)))} not run" for c in exp.configs if exp.missing_seeds(c)]
    if exp.problems or missing or gaps or not analysis.summary(BASELINE):
        lines += ["## What is missing or malformed", ""]
        lines += [f"- {p}" for p in exp.problems]
        if not analysis.summary(BASELINE):
            lines.append("- no fp32_baseline run: nothing is expressed relative to fp32")
        if missing:
            lines.append(f"- configs of the registry with no run: {', '.join(missing)}")
        lines += [f"- {g}" for g in gaps]
        lines.append("")
    lines += ["## Caveats", ""] + [f"- {c}" for c in caveats(exp)]
    lines += ["", "## Precision configs", "",
              "As recorded in the rows. Weight update: how a new value is written into fp16/bf16 weights (nearest: an "
              "update below half an ulp is lost; stochastic: rounded up or down, unbiased; kahan: rounded to nearest "
              "with a compensation buffer carrying the error to the next step). exp_avg / exp_avg_sq: the dtype AdamW's "
              "moments are stored in (uint8: block-wise 8-bit). Head weights `-`: as the other weights.", "",
              precision_table(exp), "",
              "## Setup and environment", "", setup_section(exp), "",
              f"Peak memory: {memory_kind(exp)}.", ""]
    lines += ["## Every run", "", "Values as recorded in the row (test metrics; `NaN` kept).", "", runs_table(exp), ""]
    return "\n".join(lines)


def _plot_sections(analysis: Analysis, keys, heading: str = "## Plots") -> list[str]:
    keys = [k for k in keys if k in analysis.plots]
    if not keys:
        return []
    lines = [heading, ""]
    for key in keys:
        path = analysis.plots[key]
        title, text = FIGURE_TEXT[key]
        lines.append(f"### {title}")
        lines += ["", f"{text}", "", f"![{title}]({path.name})" if path else f"Not drawn: {NOT_DRAWN[key]}.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--results_dir", required=True, help="an experiment's output dir (holds results.jsonl)")
    parser.add_argument("--output_dir", help="where summary.csv, the PNGs and report.md go (default RESULTS_DIR/analysis)")
    parser.add_argument("--quality_margin", type=float, default=DEFAULT_QUALITY_MARGIN,
                        help="relative quality loss vs fp32 still counted as 'no loss' in recommendations")
    args = parser.parse_args(argv)
    if not 0 < args.quality_margin < 1:
        print(f"error: --quality_margin must be in (0, 1) (a fraction of fp32's mean), got {args.quality_margin}",
              file=sys.stderr)
        return 2
    if not (Path(args.results_dir) / "results.jsonl").exists():
        print(f"error: {args.results_dir} has no results.jsonl (run an experiment with --output_dir there first)",
              file=sys.stderr)
        return 2
    try:
        analysis = analyze(args.results_dir, args.output_dir, quality_margin=args.quality_margin)
    except FolderRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in analysis.exp.problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(analysis.output_dir / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
