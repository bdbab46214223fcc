"""Markdown pieces shared by the per-experiment and cross-task reports: number formatting, tables, setup, caveats,
hypothesis verdicts."""
from __future__ import annotations

import math
from collections import Counter

from analysis import hypotheses
from analysis.experiment_data import Experiment, Metric, devices, is_cpu_rss, memory_kind_text
from analysis.stats import Difference, Estimate

NOT_SETUP = ("output_dir",)  # where the rows went says nothing about how they were made
ENV_FIELDS = ("device", "device_name", "cuda", "torch", "cpu_count", "torch_threads", "python", "platform",
              "git_commit")


def fmt(x: float | None, digits: int = 4) -> str:
    """'-' for missing, 'NaN'/'inf' kept visible, else `digits` significant digits."""
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def floor_flag(metric: Metric, mean: float | None) -> str:
    """' (near the floor: says little)' for a score whose mean is below its floor, else ''."""
    return " (near the floor: says little)" if metric.near_floor(mean) else ""


def fmt_mean_std(est: Estimate) -> str:
    """'mean ± std', 'mean (n=1)' for a single seed, '-' for none."""
    if est.mean is None:
        return "-"
    return f"{fmt(est.mean)} (n={est.n})" if est.std is None else f"{fmt(est.mean)} ± {fmt(est.std, 2)}"


def fmt_estimate(est: Estimate) -> str:
    if est.mean is None:
        return "-"
    if est.lo is None:
        return f"{fmt(est.mean)} (n={est.n})"
    return f"{fmt(est.mean)} ± {fmt(est.std, 2)} [{fmt(est.lo)}, {fmt(est.hi)}]"


def fmt_difference(d: Difference) -> str:
    if d.delta is None:
        return "-"
    if d.n < 2:
        return f"{d.delta:+.3g} (n={d.n}, no interval)"
    interval = "" if d.lo is None else f" [{d.lo:+.3g}, {d.hi:+.3g}]"
    p = ", no interval" if d.p_value is None else f", p={d.p_value:.2g}"
    return f"{d.delta:+.3g}{interval} ({'paired' if d.paired else 'unpaired'}, n={d.n}{p})"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _distinct(exp: Experiment, section: str, key: str) -> str:
    values = Counter(str(r[section].get(key)) for r in exp.rows if isinstance(r.get(section), dict))
    if not values:
        return "-"
    if len(values) == 1:
        return next(iter(values))
    return "; ".join(f"{v} ({n} runs)" for v, n in values.most_common())


METRIC_DEFINITIONS = {
    "macro_f1": "macro-F1 (all labels): the plan's macro-F1, the mean per-label F1 over every label of the label "
                "space, a label never gold and never predicted scoring 0 (scikit-learn `f1_score(average=\"macro\", "
                "zero_division=0)`)",
    "macro_f1_present_labels": "macro-F1 (labels with gold): the same mean over only the labels with at least one "
                               "gold positive in the evaluated split",
}


def recipe_departures(exp: Experiment) -> list[list[str]]:
    """[field, value in these runs, the reference recipe's] for every field some row departs from its recipe in."""
    recorded = [r["recipe_departures"] for r in exp.rows if isinstance(r.get("recipe_departures"), dict)]
    fields = dict.fromkeys(k for d in recorded for k in d)
    rows = []
    for name in fields:
        values = Counter(str(d[name]["value"]) if name in d else "the recipe's" for d in recorded)
        value = next(iter(values)) if len(values) == 1 else "; ".join(f"{v} ({n} runs)" for v, n in values.items())
        rows.append([name, value, str(next(d[name]["recipe"] for d in recorded if name in d))])
    return rows


def setup_section(exp: Experiment) -> str:
    """Departures from the reference recipe, the metric definitions that differ between conventions, then the
    training setup and environment as recorded in the rows (several values: each with its run count)."""
    recorded = any(isinstance(r.get("recipe_departures"), dict) for r in exp.rows)
    departures = recipe_departures(exp)
    parts = []
    if departures:
        parts += ["Departures from the reference recipe (classification: the plan's; LM: PLAN.md's GPT-2 small), "
                  "from the preset or flags:", "", md_table(["field", "these runs", "recipe"], departures), ""]
    elif recorded:
        parts += ["These runs use the reference recipe unchanged (classification: the plan's; LM: PLAN.md's).", ""]
    else:
        parts += ["The rows do not record departures from the reference recipe (written before it was recorded).", ""]
    defined = [text for key, text in METRIC_DEFINITIONS.items() if any(key in r for r in exp.rows)]
    if defined:
        parts += ["Metrics: " + "; ".join(defined) + ".", ""]
    keys = dict.fromkeys(k for r in exp.rows for k in (r.get("train_config") or {}) if k not in NOT_SETUP)
    rows = [[f"train_config.{k}", _distinct(exp, "train_config", k)] for k in keys]
    rows += [[f"env.{k}", _distinct(exp, "env", k)] for k in ENV_FIELDS
             if any(k in (r.get("env") or {}) for r in exp.rows)]
    if not rows:
        return "\n".join(parts + ["No row carries `train_config` or `env` (only rows of crashed processes?)."])
    return "\n".join(parts + [md_table(["field", "value"], rows)])


PRECISION_COLUMNS = (  # results-row `precision` record field -> column
    ("weight_dtype", "weights"), ("head_weight_dtype", "head weights"), ("autocast_dtype", "autocast"),
    ("loss_scaling", "loss scaling"), ("weight_update_rounding", "weight update"), ("exp_avg_dtype", "exp_avg"),
    ("exp_avg_sq_dtype", "exp_avg_sq"), ("optimizer", "optimizer"),
)


def precision_table(exp: Experiment) -> str:
    """What each config does, from its rows' `precision` record, and what was compiled, from its rows."""
    rows = []
    for config in exp.configs:
        record = exp.precision(config)
        runs = [r for r in exp.runs(config) if "compiled" in r]
        compiled = sorted({f"{'yes' if r['compiled'] else 'no'} / "
                           + {True: "yes", False: "no", None: "-"}[r.get("optimizer_step_compiled")] for r in runs})
        rows.append([config] + [str(record.get(k, "-")) if record.get(k) is not None else "-"
                                for k, _ in PRECISION_COLUMNS] + ["; ".join(compiled) or "-"])
    return md_table(["config"] + [label for _, label in PRECISION_COLUMNS] + ["compiled (model / optimizer step)"],
                    rows)


def memory_kind(exp: Experiment) -> str:
    kinds = sorted({r["peak_memory_kind"] for r in exp.rows if r.get("peak_memory_kind")})
    return "; ".join(f"`{k}` = {memory_kind_text(k)}" for k in kinds) or "not recorded"


def caveats(exp: Experiment) -> list[str]:
    """What a reader must know before acting on these numbers, derived from the rows."""
    out = []
    presets = {(r.get("train_config") or {}).get("preset") for r in exp.rows}
    offline = sorted(p for p in presets if p in ("tiny", "demo", "demo_pretrain"))
    if offline:
        out.append(f"These are offline `--preset {'/'.join(offline)}` runs: a small model on a synthetic corpus (`demo`: "
                   "fine-tuning a checkpoint trained on that corpus, every seed from the same weights). Their quality "
                   "numbers say how configs compare at this scale; they are not EURLEX57K (or OpenWebText) numbers.")
    if devices(exp) - {"cuda"}:
        out.append("Runs on CPU: bf16/fp16 matmuls are emulated or run on kernels unlike a GPU's, so throughput ratios "
                   "here say nothing about tensor-core speed-ups; fp16 in particular is far slower on most x86 CPUs.")
    if any(is_cpu_rss(r.get("peak_memory_kind")) for r in exp.rows):
        out.append("CPU peak memory is the peak resident set size (RSS) of the run process (Python, libraries, data, "
                   "allocator caches included), not the tensors' bytes: differences between configs are diluted.")
    seeds = [n for n in (len(exp.runs(c, "completed")) for c in exp.configs) if n]
    if seeds and min(seeds) < 3:
        out.append(f"Some configs have fewer than 3 completed seeds (min {min(seeds)}): intervals are wide or absent "
                   "(n=1 has none), and 'not significant' mostly means 'not enough seeds'.")
    out.append("Means and intervals use completed runs; diverged, failed and skipped runs are counted in the status "
               "columns and explained in the stability matrix. Quality verdicts count them: a config with a diverged "
               "or failed run is never equivalent, and its loss is tested with the divergences counted. Pareto "
               "fronts compare means and ignore their intervals.")
    return out


def hypotheses_section(verdicts: dict[str, dict], scope: str, shown_tasks: tuple[str, ...] | None = None) -> list[str]:
    """The hypotheses in PLAN.md's words, each with its verdict, and per task every claim with its test, outcome,
    reason and what would settle it (`hypotheses.evaluate_all`'s output). `scope` says which results they were
    evaluated on; `shown_tasks` limits the claim lines to those tasks (the others are named, not detailed)."""
    lines = ["## Hypotheses", "", f"Stated and decided as in `experiments/classification/PLAN.md` (generated from "
             f"`analysis/hypotheses.py`), on {scope}: a hypothesis is supported when every claim is, refuted when "
             "any claim is; a claim only when its test at the stated level says so, with at least "
             f"{hypotheses.MIN_SEEDS} runs per config; anything else is inconclusive. Quality claims carry the "
             "quality verdict of their pair (Holm-corrected over the experiment's comparisons, divergences "
             "counted), the same one the \"Which config should I use\" table shows.", ""]
    for key, v in verdicts.items():
        lines += [f"### {key}: **{v['verdict']}**", "", v["statement"], ""]
        for task, result in v["tasks"].items():
            role = "" if result["decides"] else " (reported beside the verdict, not deciding it)"
            if shown_tasks is not None and task not in shown_tasks:
                lines.append(f"- {task}{role}: no {task} results in this report")
                continue
            lines.append(f"- {task}{role}: **{result['verdict']}**")
            lines += [f"  - {c['outcome']}: {c['claim']} — {c['reason']}"
                      + (f". Would settle it: {c['settle']}" if c["settle"] else "") for c in result["claims"]]
        lines.append("")
    return lines
