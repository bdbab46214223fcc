"""Compare the precision configs across the two experiments: ranks, Spearman correlations, flips, verdicts on the
study's hypotheses H1-H4, and recommendations, written to comparison.json and report.md (with each experiment's own
report in a sub-folder).

    python analysis/compare_experiments.py --lm_results results/lm --cls_results results/classification \\
        --output_dir results/comparison

The hypotheses and the tests that decide them are defined in analysis/hypotheses.py (and stated, from there, in
experiments/classification/PLAN.md); every verdict carries its claims' tests, n and intervals, and an inconclusive
one says what would settle it.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path


if not __package__:  # run as a file (python analysis/compare_experiments.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis import plots  # noqa: E402
from analysis import hypotheses  # noqa: E402
from analysis.analyze_experiment import (  # noqa: E402
    ANALYSIS_MARKER, DEFAULT_QUALITY_MARGIN, Analysis, analyze, findings, finish_interrupted_writes, oriented,
    quality_verdicts,
)
from analysis.experiment_data import Metric, styles  # noqa: E402
from analysis.report import caveats, fmt, fmt_difference, hypotheses_section, md_table  # noqa: E402
from analysis.stats import by_seed, difference, ranks, spearman  # noqa: E402
from analysis.verdicts import KEEPS_QUALITY, decision_rule  # noqa: E402

from dtype_bench.configs import HelpFormatter  # noqa: E402
from dtype_bench.io import FolderRefused, atomic_directory, atomic_write_json, atomic_write_text  # noqa: E402
from dtype_bench.results import read_results  # noqa: E402

ROLES = ("quality", "throughput", "memory")


def role_metric(analysis: Analysis, role: str) -> Metric | None:
    return analysis.exp.primary_metric(role)


def seed_values(analysis: Analysis, metric: Metric) -> dict[str, dict[int, float]]:
    """config -> seed -> value over completed runs, for configs whose values are all finite (NaN has no rank)."""
    out = {}
    for config in analysis.exp.configs:
        values = by_seed(analysis.exp.runs(config, "completed"), metric.key)
        if values and all(math.isfinite(v) for v in values.values()):
            out[config] = values
    return out


def _mean(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values)


# ---------------------------------------------------------------- ranks, correlations, flips


def cross_task_tables(tasks: dict[str, Analysis]) -> tuple[dict, dict, list[dict]]:
    """Ranks per role and task, Spearman per role, and flips (pairs ordered differently in the two tasks)."""
    (name_a, a), (name_b, b) = tasks.items()
    rank_table, correlations, flips = {}, {}, []
    for role in ROLES:
        metric_a, metric_b = role_metric(a, role), role_metric(b, role)
        if metric_a is None or metric_b is None:
            correlations[role] = {"note": "metric missing in one task"}
            continue
        values_a, values_b = seed_values(a, metric_a), seed_values(b, metric_b)
        common = [c for c in values_a if c in values_b]
        rank_table[role] = {
            name_a: {"metric": metric_a.key, "ranks": ranks({c: _mean(values_a[c]) for c in common}, metric_a)},
            name_b: {"metric": metric_b.key, "ranks": ranks({c: _mean(values_b[c]) for c in common}, metric_b)},
        }
        # Spearman on the oriented means: rank 1 = best in both tasks, whatever the metric's direction.
        turned = lambda values, m: {c: {s: (v if m.higher_is_better else -v) for s, v in values[c].items()}  # noqa: E731
                                    for c in common}
        corr = spearman(turned(values_a, metric_a), turned(values_b, metric_b))
        excluded = sorted((set(a.exp.configs) | set(b.exp.configs)) - set(common))
        correlations[role] = {"metrics": {name_a: metric_a.key, name_b: metric_b.key}, "rho": corr.rho,
                              "p_value": corr.p_value, "bootstrap_ci95": [corr.ci_lo, corr.ci_hi],
                              "bootstrap_resamples": corr.bootstrap_resamples, "n_configs": corr.n_configs,
                              "configs_without_finite_values_in_both": excluded}
        for c1, c2 in itertools.combinations(common, 2):
            gaps = {}
            for name, values, metric in ((name_a, values_a, metric_a), (name_b, values_b, metric_b)):
                d = difference(values[c1], values[c2])
                delta, lo, hi = oriented(d, metric)
                scale = abs(_mean(values.get("fp32_baseline") or values[c1])) or 1.0
                gaps[name] = {"metric": metric.key, "better": c1 if delta > 0 else c2 if delta < 0 else None,
                              "delta_oriented": delta, "relative_gap": abs(delta) / scale,
                              "significant": d.significant, "difference": fmt_difference(d)}
            if None not in (gaps[name_a]["better"], gaps[name_b]["better"]) and \
                    gaps[name_a]["better"] != gaps[name_b]["better"]:
                flips.append({"role": role, "pair": [c1, c2],
                              "size": min(g["relative_gap"] for g in gaps.values()),
                              "significant_in_both": all(g["significant"] for g in gaps.values()), "tasks": gaps})
    flips.sort(key=lambda f: -f["size"])
    return rank_table, correlations, flips


# ---------------------------------------------------------------- recommendations


def _ratios(analysis: Analysis, config: str) -> str:
    """'<throughput> 1.4× fp32, memory 0.9× fp32, ' with the parts that exist."""
    summary, parts = analysis.summary(config), []
    for role in ("throughput", "memory"):
        metric = role_metric(analysis, role)
        if metric and summary.vs_baseline.get(metric.key) is not None:
            parts.append(f"{metric.label} {fmt(summary.vs_baseline[metric.key], 3)}× fp32")
    return "".join(p + ", " for p in parts)


def recommendations(tasks: dict[str, Analysis]) -> dict:
    per_task = {name: quality_verdicts(a) for name, a in tasks.items()}
    universal, avoid = [], []
    configs = [c for c in next(iter(tasks.values())).exp.configs if all(c in v for v in per_task.values())]
    for config in configs:
        outcomes = {name: per_task[name][config] for name in tasks}
        evidence = "; ".join(f"{name}: {_ratios(a, config)}{outcomes[name].text()}" for name, a in tasks.items())
        if config != "fp32_baseline" and all(v.kind in KEEPS_QUALITY for v in outcomes.values()):
            universal.append(f"{config} stays within the margin in both tasks — {evidence}")
        elif all(v.kind in ("loss", "unstable") for v in outcomes.values()):
            avoid.append(f"avoid {config} in both tasks — {evidence}")
    universal.sort()
    return {"universal": universal or ["no config other than fp32_baseline is shown within the margin in both tasks"],
            "avoid_everywhere": avoid, "per_task": {name: findings(a) for name, a in tasks.items()}}


# ---------------------------------------------------------------- output


def rank_plot(tasks: dict[str, Analysis], rank_table: dict, correlations: dict, path: Path) -> Path | None:
    roles = [r for r in ROLES if r in rank_table]
    if not roles:
        return None
    (name_a, a), (name_b, b) = tasks.items()
    style = styles({**b.exp.precisions(), **a.exp.precisions()})
    fig, axes = plt.subplots(1, len(roles), figsize=(5.2 * len(roles), 5), squeeze=False, layout="constrained")
    for ax, role in zip(axes[0], roles):
        ra, rb = rank_table[role][name_a]["ranks"], rank_table[role][name_b]["ranks"]
        for config in ra:
            s = style[config]
            ax.scatter(ra[config], rb[config], color=s.colour, marker=s.marker, s=60, label=config,
                       facecolors="none" if s.eight_bit else s.colour)
            ax.annotate(config, (ra[config], rb[config]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        n = len(ra)
        ax.plot([1, max(n, 1)], [1, max(n, 1)], color="black", linewidth=0.6, linestyle=":")
        corr = correlations[role]
        ax.set(title=f"{role} rank (1 = best): Spearman ρ={fmt(corr['rho'], 2)}, p={fmt(corr['p_value'], 2)}",
               xlabel=f"{name_a} ({rank_table[role][name_a]['metric']})",
               ylabel=f"{name_b} ({rank_table[role][name_b]['metric']})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    plots.legend_below(fig, plots.drawn_handles(axes))  # one legend, however many configs
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_comparison_report(tasks: dict[str, Analysis], comparison: dict, figure: Path | None,
                             output_dir: Path) -> str:
    lines = ["# dtype-bench: language modelling vs classification", "", "## Recommendations", "",
             "Both tasks:", ""]
    lines += [f"- {r}" for r in comparison["recommendations"]["universal"] + comparison["recommendations"]["avoid_everywhere"]]
    for name, items in comparison["recommendations"]["per_task"].items():
        lines += ["", f"{name}:", ""] + [f"- {r}" for r in items]
    lines += ["", "The same precision configs trained in both experiments; each experiment's own report (setup, "
              "summary table, stability, plots):", ""]
    lines += [f"- **{name}**: [{a.output_dir.relative_to(output_dir)}/report.md]"
              f"({a.output_dir.relative_to(output_dir)}/report.md) — {len(a.exp.rows)} runs of "
              f"{len(a.exp.configs)} configs from `{a.exp.results_dir}`" for name, a in tasks.items()]
    lines += ["", f"Decision rule and error control (verdicts, hypotheses, recommendations): "
                  f"{decision_rule(comparison['quality_margin'])} The frontier claim is Holm-corrected over the "
                  "configs it is compared with."]
    problems = [f"{name}: {p}" for name, a in tasks.items() for p in a.exp.problems]
    only = {name: sorted(set(a.exp.configs) - set.intersection(*(set(t.exp.configs) for t in tasks.values())))
            for name, a in tasks.items()}
    if problems or any(only.values()):
        lines += ["", "## What is missing or malformed", ""] + [f"- {p}" for p in problems]
        lines += [f"- configs run only in {name}: {', '.join(c)}" for name, c in only.items() if c]
    lines += [""] + hypotheses_section(comparison["verdicts"], "both experiments' results (numbers in "
                                        "`comparison.json`)")
    lines += ["", "## Rank correlation per metric", "",
              "Spearman ρ between the configs' mean values in the two tasks (oriented so that better = higher), its "
              "p-value, and a 95% percentile bootstrap interval resampling each config's seeds.", ""]
    rows = [[role, " / ".join(f"{k}: {v}" for k, v in c.get("metrics", {}).items()), fmt(c.get("rho"), 3),
             fmt(c.get("p_value"), 3), f"[{fmt(c['bootstrap_ci95'][0], 3)}, {fmt(c['bootstrap_ci95'][1], 3)}]"
             if "bootstrap_ci95" in c else "-", str(c.get("n_configs", "-")), c.get("note", "")]
            for role, c in comparison["correlations"].items()]
    lines += [md_table(["metric", "keys", "ρ", "p", "bootstrap 95% CI", "configs", "note"], rows), ""]
    lines += [f"![config ranks in both tasks]({figure.name})" if figure else "Rank plot not drawn: no common metric.", ""]
    lines += ["## Ranks", ""]
    for role, per_task in comparison["ranks"].items():
        names = list(per_task)
        configs = list(per_task[names[0]]["ranks"])
        lines += [f"{role}:", "", md_table(["config"] + [f"{n} ({per_task[n]['metric']})" for n in names],
                                           [[c] + [fmt(per_task[n]["ranks"][c], 3) for n in names] for c in configs]), ""]
    lines += ["## Flips (order reverses between tasks, largest first)", "",
              "Size = the smaller of the two tasks' gaps relative to fp32's mean: a flip is large only if it is "
              "large in both tasks.", ""]
    rows = [[f["role"], " vs ".join(f["pair"]), fmt(f["size"], 3), "yes" if f["significant_in_both"] else "no"]
            + [f"{g['better']} better: {g['difference']}" for g in f["tasks"].values()]
            for f in comparison["flips"][:15]]
    lines += [md_table(["metric", "pair", "size", "significant in both"] + list(tasks), rows) if rows
              else "No flips: every pair of configs is ordered the same way in both tasks.", ""]
    lines += ["## Caveats", ""] + [f"- {c}" for c in dict.fromkeys(c for a in tasks.values() for c in caveats(a.exp))]
    return "\n".join(lines) + "\n"


def compare(lm_results: str | Path, cls_results: str | Path, output_dir: str | Path, *,
            quality_margin: float = DEFAULT_QUALITY_MARGIN) -> dict:
    """Write the comparison (and each task's analysis under it) into `output_dir` as a whole: built in a temporary
    folder that replaces the previous comparison only when complete."""
    finish_interrupted_writes(Path(output_dir))
    with atomic_directory(output_dir, ANALYSIS_MARKER, "written_by") as tmp:
        atomic_write_json(tmp / ANALYSIS_MARKER, {"written_by": "analysis/compare_experiments.py"})
        return _compare_into(tmp, lm_results, cls_results, quality_margin)


def _compare_into(output_dir: Path, lm_results: str | Path, cls_results: str | Path, quality_margin: float) -> dict:
    tasks = {"lm": analyze(lm_results, output_dir / "lm", quality_margin=quality_margin),
             "classification": analyze(cls_results, output_dir / "classification", quality_margin=quality_margin)}
    rank_table, correlations, flips = cross_task_tables(tasks)
    comparison = {
        "tasks": {name: {"results_dir": str(a.exp.results_dir), "experiment": a.exp.name,
                         "configs": a.exp.configs, "runs": len(a.exp.rows), "problems": a.exp.problems,
                         "metrics": {role: getattr(role_metric(a, role), "key", None) for role in ROLES}}
                  for name, a in tasks.items()},
        "quality_margin": quality_margin,
        "ranks": rank_table, "correlations": correlations, "flips": flips,
        "verdicts": hypotheses.evaluate_all({name: a.exp for name, a in tasks.items()}),
        "recommendations": recommendations(tasks),
    }
    atomic_write_json(output_dir / "comparison.json", comparison)
    figure = rank_plot(tasks, rank_table, correlations, output_dir / "ranks.png")
    atomic_write_text(output_dir / "report.md", render_comparison_report(tasks, comparison, figure, output_dir))
    return comparison


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--lm_results", required=True, help="the LM experiment's output dir (results.jsonl)")
    parser.add_argument("--cls_results", required=True, help="the classification experiment's output dir")
    parser.add_argument("--output_dir", required=True, help="where comparison.json, report.md and the per-task "
                                                            "analyses go")
    parser.add_argument("--quality_margin", type=float, default=DEFAULT_QUALITY_MARGIN,
                        help="equivalence margin (relative to fp32's mean) of the recommendations; the hypotheses "
                             "keep the margin analysis/hypotheses.py states")
    args = parser.parse_args(argv)
    if not 0 < args.quality_margin < 1:
        print(f"error: --quality_margin must be in (0, 1) (a fraction of fp32's mean), got {args.quality_margin}",
              file=sys.stderr)
        return 2
    for flag, path, experiment in (("--lm_results", args.lm_results, "lm"),
                                   ("--cls_results", args.cls_results, "classification")):
        if not (Path(path) / "results.jsonl").exists():
            print(f"error: {flag} {path} has no results.jsonl", file=sys.stderr)
            return 2
        found = {row.get("experiment") for row in read_results(path)[0]} - {experiment}
        if found:
            print(f"error: {flag} {path} holds results of the {', '.join(sorted(map(str, found)))} experiment, "
                  f"not {experiment}", file=sys.stderr)
            return 2
    try:
        comparison = compare(args.lm_results, args.cls_results, args.output_dir, quality_margin=args.quality_margin)
    except FolderRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, task in comparison["tasks"].items():
        for problem in task["problems"]:
            print(f"warning: {name}: {problem}", file=sys.stderr)
    print(Path(args.output_dir) / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
