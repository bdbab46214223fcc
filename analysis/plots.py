"""PNG figures of one experiment. Colours come from each config's precision family (fp32 grey, fp16 red, bf16 blue);
8-bit optimizer states are dashed (lines) or hatched (bars). Non-finite values are drawn, not dropped: lines break
at NaN and an 'x' on the top edge marks each step whose mean value is NaN or infinite. A figure has one legend, below
its panels, in as many columns as its width holds; the figure grows by the legend's height, so all 18 configs of the
registry (x 3 parameter groups in the diagnostics) stay readable without covering the data.

Each function writes one file and returns its path, or None when the results hold nothing to draw (the caller says
so in the report).
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import Bbox, blended_transform_factory  # noqa: E402

from analysis.experiment_data import ACT_GRAD_FLUSHED, BASELINE, Experiment, Metric, Style, devices  # noqa: E402
from analysis.stats import ConfigSummary  # noqa: E402

DIAGNOSTICS = (  # step-log field (a/b: field a's entry b) -> panel title; each holds {group: value}
    ("update_fidelity", "update fidelity (applied / intended, fp32 shadow)"),
    ("lost_update_frac", "weight elements the update left unchanged (round to nearest: the update is lost; "
                         "stochastic rounding: unchanged by design, unbiased on average, see update fidelity)"),
    ("moment_update_lost_frac/exp_avg_sq", "second-moment updates lost (fp32 would change it)"),
    ("moment_update_lost_frac/exp_avg", "first-moment updates lost"),
    ("grad_subnormal_frac", "parameter gradients subnormal in their dtype (structural zeros excluded)"),
    ("act_grad_subnormal_frac", "activation gradients subnormal in the consuming matmul's dtype (loss scale applied)"),
    ("act_grad_zero_in_live_rows_frac", "activation gradients exactly zero inside live rows (loss scale applied; "
                                        "flushed or exact)"),
    (ACT_GRAD_FLUSHED, "activation gradients flushed to zero, whole rows included (vs fp32's structural rows)"),
)
GROUP_MARKERS = "os^v<>"
LEGEND_FONTSIZE = 9


def _lookup(record: dict, key: str):
    """record[key], or record[a][b]... for key 'a/b/...' (per-group diagnostics); None when absent."""
    value = record
    for part in key.split("/"):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _value(record: dict, key: str) -> float | None:
    value = _lookup(record, key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def series(exp: Experiment, config: str, key: str, *, evaluation: bool = False):
    """Steps and the mean / min / max over seeds at each step (seeds that logged that step; NaN propagates)."""
    per_step: dict[int, list[float]] = {}
    for row in exp.runs(config):
        rid = row.get("run_id")
        records = exp.eval_records(rid) if evaluation else exp.training_records(rid)
        for rec in records:
            value = _value(rec, key)
            if value is not None and "step" in rec:
                per_step.setdefault(rec["step"], []).append(value)
    steps = np.array(sorted(per_step))
    values = [np.array(per_step[s]) for s in steps]
    mean = np.array([v.mean() for v in values])
    lo = np.array([v.min() for v in values])
    hi = np.array([v.max() for v in values])
    return steps, mean, lo, hi


def _mark_nonfinite(ax, steps: np.ndarray, values: np.ndarray, style: Style) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        ax.scatter(steps[bad], np.full(bad.sum(), 0.98), marker="x", color=style.colour, s=25,
                   transform=blended_transform_factory(ax.transData, ax.transAxes), clip_on=False)


def _line(ax, steps, values, style: Style, label: str, **kw) -> None:
    """A line that breaks at non-finite values; finite points with no finite neighbour (a run that went NaN
    after one step) get a dot, since a line through one point is invisible."""
    ax.plot(steps, values, color=style.colour, linestyle=style.linestyle, label=label, **kw)
    finite = np.isfinite(values)
    neighbour = np.zeros_like(finite)
    neighbour[1:] |= finite[:-1]
    neighbour[:-1] |= finite[1:]
    alone = finite & ~neighbour
    if alone.any():
        ax.scatter(steps[alone], values[alone], color=style.colour, s=12)
    _mark_nonfinite(ax, steps, values, style)


def drawn_handles(axes) -> dict[str, Artist]:
    """Label -> artist of everything labelled in `axes`, each label once (the first panel that drew it)."""
    handles: dict[str, Artist] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    return handles


def legend_below(fig, handles: dict[str, Artist]) -> Legend:
    """One legend for the figure (made with layout="constrained"), below its panels, in as many columns as fit the
    figure's width; the figure grows by the legend's height, so the panels keep their size however many entries
    there are."""
    renderer = fig.canvas.get_renderer()
    for ncols in range(len(handles), 0, -1):
        legend = fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=ncols,
                            fontsize=LEGEND_FONTSIZE, frameon=False)
        if ncols == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width:
            break
        legend.remove()
    fig.set_figheight(fig.get_figheight() + legend.get_window_extent(renderer).height / fig.dpi)
    return legend


def _config_handles(configs, styles: dict[str, Style], *, marker: bool) -> dict[str, Line2D]:
    """Legend entries drawn from each config's style: its marker alone (scatter plots) or its line."""
    return {c: Line2D([], [], color=styles[c].colour, linestyle="none" if marker else styles[c].linestyle,
                      marker=styles[c].marker if marker else None,
                      markerfacecolor="none" if marker and styles[c].eight_bit else styles[c].colour)
            for c in configs}


LABEL_OFFSETS = ((4, 4, "left"), (-4, 4, "right"), (4, -12, "left"), (-4, -12, "right"), (4, 14, "left"),
                 (-4, 14, "right"), (4, -22, "left"), (-4, -22, "right"), (0, 24, "center"), (0, -32, "center"))
"""Where a point's name may go, in points from the point (x, y, alignment), tried in order."""


def place_labels(ax, labels: list[tuple[str, float, float]], fontsize: float = 7) -> None:
    """Name each (name, x, y) point beside it at the first of LABEL_OFFSETS where the name stays inside the panel
    and overlaps neither another name nor a point (the first offset when none is free). Call after the figure's
    layout is final (legends added): it measures the names as drawn."""
    fig = ax.figure
    fig.canvas.draw()  # settles the constrained layout, so the positions measured below are the saved ones
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    points = ax.transData.transform([(x, y) for _, x, y in labels])
    taken = [Bbox.from_bounds(px - 5, py - 5, 10, 10) for px, py in points]  # the markers
    for name, x, y in labels:
        placed = None
        for dx, dy, ha in LABEL_OFFSETS:
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, ha=ha,
                               va="bottom")
            text.set_in_layout(False)
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in taken):
                placed = text, box
                break
            if placed is None and (dx, dy, ha) == LABEL_OFFSETS[0]:
                first = text, box  # nowhere free: the first place
            text.remove()
        text, box = placed or first
        if placed is None:
            ax.add_artist(text)
        taken.append(box)


def nested_widths(configs: list[str], thinnest: float = 1.0, widest: float = 3.5) -> dict[str, float]:
    """Line width per config, widest drawn first: curves that coincide (configs that train alike) show as nested
    bands of their colours instead of only the last one drawn."""
    step = (widest - thinnest) / max(len(configs) - 1, 1)
    return {c: widest - i * step for i, c in enumerate(configs)}


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(exp: Experiment, styles: dict[str, Style], path: Path) -> Path | None:
    """Training loss (mean over seeds, band = min..max) and validation loss; diverged runs marked at their step."""
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    drawn, width_of = False, nested_widths(exp.configs)
    for config in exp.configs:
        style = styles[config]
        steps, mean, lo, hi = series(exp, config, "loss")
        if len(steps):
            drawn = True
            width = max(1, len(steps) // 25)  # a centred moving average: a config's trend, not its step noise
            smooth = np.convolve(mean, np.ones(width) / width, mode="valid")
            _line(train_ax, steps[(width - 1) // 2:][:len(smooth)], smooth, style, config,
                  linewidth=width_of[config])
            if width == 1:
                train_ax.fill_between(steps, lo, hi, color=style.colour, alpha=0.15, linewidth=0)
        key = "loss" if any("loss" in r for row in exp.runs(config) for r in exp.eval_records(row.get("run_id"))) \
            else "val_loss"
        steps, mean, _, _ = series(exp, config, key, evaluation=True)
        if len(steps):
            _line(val_ax, steps, mean, style, config, marker=style.marker, markersize=4, linewidth=width_of[config])
        for row in exp.runs(config, "diverged"):
            step = row.get("diverged_at_step")
            if step is not None:
                train_ax.axvline(step, color=style.colour, linestyle=":", linewidth=1)
                train_ax.annotate(f"{config} s{row['seed']} diverged @ {step}", (step, 0.9), rotation=90, fontsize=7,
                                  xycoords=("data", "axes fraction"), va="top", ha="right", color=style.colour)
    if not drawn:
        plt.close(fig)
        return None
    train_ax.set(title="training loss (mean over seeds, moving average)", xlabel="optimizer step", ylabel="loss")
    val_ax.set(title="validation loss (mean over seeds)", xlabel="optimizer step", ylabel="loss")
    legend_below(fig, drawn_handles([train_ax, val_ax]))
    return _save(fig, path)


def relative_bars(exp: Experiment, summaries: list[ConfigSummary], styles: dict[str, Style], throughput: Metric,
                  memory: Metric, path: Path) -> Path | None:
    """Throughput and peak memory of each config relative to fp32_baseline's mean (1.0 = same): bar = the config's
    mean, dots = its seeds (the 95% intervals are in the summary table; with 2-3 seeds they would swamp the bars)."""
    if not any(s.config == BASELINE and s.estimates[throughput.key].mean for s in summaries):
        return None
    base = {m.key: next(s for s in summaries if s.config == BASELINE).estimates[m.key].mean for m in (throughput, memory)}
    emulated = set(exp.emulated_configs())
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(summaries) + 1.8), layout="constrained")
    for ax, metric, title in ((axes[0], throughput, f"{throughput.label}: speed-up vs fp32"),
                              (axes[1], memory, f"{memory.label}: ratio to fp32")):
        for y, s in enumerate(summaries):
            est, style = s.estimates[metric.key], styles[s.config]
            if est.mean is None:
                why = ("matmuls emulated: not measured" if s.config in emulated else
                       f"no completed run ({', '.join(k for k, n in s.status_counts.items() if n)})")
                ax.text(0.02, y, why,
                        va="center", fontsize=8, transform=blended_transform_factory(ax.transAxes, ax.transData))
                continue
            ratio = est.mean / base[metric.key]
            ax.barh(y, ratio, color=style.colour, hatch=style.hatch, edgecolor="black", linestyle=style.linestyle)
            ax.scatter(np.array(est.values) / base[metric.key], np.full(len(est.values), y), color="black", s=10,
                       zorder=3)
            ax.text(ratio, y + 0.3, f" {ratio:.2f}×", va="center", fontsize=8)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(summaries)), [s.config for s in summaries], fontsize=8)
        ax.invert_yaxis()
        ax.set(title=title, xlabel="mean / fp32_baseline mean (dots: single seeds)")
    if devices(exp) == {"cpu"}:
        fig.suptitle("Measured on a CPU: relative speeds and memory say nothing about a GPU", fontsize=10)
    return _save(fig, path)


def pareto(summaries: list[ConfigSummary], styles: dict[str, Style], quality: Metric,
           panels: list[tuple[Metric, list[str]]], margin: float, path: Path) -> Path | None:
    """Per panel (x metric, its frontier): quality vs x, means with min..max over seeds as error bars (95%
    t-intervals of 2-3 seeds are too wide to read; they are in the summary table); the frontier joined by a line.
    The quality axis spans at least fp32's mean ± `margin` (relative), shaded, so configs the verdicts call
    equivalent are drawn inside one band instead of far apart on a range magnified to the seed noise."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False, layout="constrained")
    drawn: set[str] = set()  # configs with a point in some panel
    labels: dict = {}  # panel -> its points' (name, x, y), placed once the layout is final
    baseline = next((s.estimates[quality.key].mean for s in summaries if s.config == BASELINE), None)
    band = (None if baseline is None or not math.isfinite(baseline)
            else (baseline - margin * abs(baseline), baseline + margin * abs(baseline)))
    for ax, (x_metric, front) in zip(axes[0], panels):
        shown = [s for s in summaries if all(
            s.estimates[k].mean is not None and math.isfinite(s.estimates[k].mean) for k in (x_metric.key, quality.key))]
        if not shown:
            continue
        labels[ax] = []
        y_lo, y_hi = band or (math.inf, -math.inf)
        for s in shown:
            ex, ey = s.estimates[x_metric.key], s.estimates[quality.key]
            drawn.add(s.config)
            style = styles[s.config]
            xerr = [[ex.mean - min(ex.values)], [max(ex.values) - ex.mean]]
            yerr = [[ey.mean - min(ey.values)], [max(ey.values) - ey.mean]]
            y_lo, y_hi = min(y_lo, min(ey.values)), max(y_hi, max(ey.values))
            on_front = s.config in front
            container = ax.errorbar(ex.mean, ey.mean, xerr=xerr, yerr=yerr, fmt=style.marker, color=style.colour,
                                    markersize=9 if on_front else 6, alpha=1.0 if on_front else 0.5, capsize=2,
                                    markerfacecolor="none" if style.eight_bit else style.colour)
            for bar in container[2]:
                bar.set_linestyle(style.linestyle)
            labels[ax].append((s.config, ex.mean, ey.mean))
        points = sorted((s.estimates[x_metric.key].mean, s.estimates[quality.key].mean)
                        for s in shown if s.config in front)
        if len(points) > 1:
            ax.plot(*zip(*points), color="black", linewidth=0.8, linestyle="-", zorder=0)
        if band:
            ax.axhspan(*band, color="grey", alpha=0.15, zorder=-1, linewidth=0)
        pad = 0.05 * (y_hi - y_lo) if y_hi > y_lo else 0.05 * abs(y_hi) or 0.05
        ax.set_ylim(y_lo - 2 * pad, y_hi + 2 * pad)  # room for names above and below the outermost points
        ax.margins(x=0.1)
        better = lambda m: "higher is better" if m.higher_is_better else "lower is better"  # noqa: E731
        ax.set(xlabel=f"{x_metric.label} ({better(x_metric)})", ylabel=f"{quality.label} ({better(quality)})",
               title=f"{quality.label} vs {x_metric.label}\nfrontier = black line (faded: dominated)"
                     + (f"; grey: fp32 mean ± {margin:.0%}" if band else ""))
    if not drawn:
        plt.close(fig)
        return None
    legend_below(fig, _config_handles([s.config for s in summaries if s.config in drawn], styles, marker=True))
    for ax, points in labels.items():
        place_labels(ax, points)
    return _save(fig, path)


def step_signal(exp: Experiment, styles: dict[str, Style], key: str, title: str, ylabel: str, path: Path, *,
                log: bool = True, reference: tuple[float, str] | None = None) -> Path | None:
    """One training-log signal per config (mean over seeds) against the optimizer step."""
    fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    drawn, width_of = False, nested_widths(exp.configs)
    for config in exp.configs:
        steps, mean, _, _ = series(exp, config, key)
        if len(steps):
            drawn = True
            _line(ax, steps, mean, styles[config], config, linewidth=width_of[config])
    if not drawn:
        plt.close(fig)
        return None
    if reference:
        ax.axhline(reference[0], color="black", linestyle="--", linewidth=1, label=reference[1])
    if log:
        ax.set_yscale("log")
    ax.set(title=title + " ('x' on the top edge: non-finite)", xlabel="optimizer step", ylabel=ylabel)
    legend_below(fig, drawn_handles(ax))
    return _save(fig, path)


def loss_scale(exp: Experiment, styles: dict[str, Style], path: Path) -> Path | None:
    """Dynamic loss scale (logged at flush steps) and cumulative scaler-skipped steps, for configs that scale."""
    scaled = [c for c in exp.configs if exp.precision(c).get("loss_scaling") == "dynamic"]
    fig, (scale_ax, skip_ax) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    drawn = False
    for config in scaled:
        steps, mean, _, _ = series(exp, config, "loss_scale")
        if len(steps):
            drawn = True
            _line(scale_ax, steps, mean, styles[config], config, marker=".")
        steps, mean, _, _ = series(exp, config, "skipped_steps")
        if len(steps):
            _line(skip_ax, steps, mean, styles[config], config)
    if not drawn:
        plt.close(fig)
        return None
    scale_ax.set_yscale("log", base=2)
    scale_ax.set(title="GradScaler loss scale (mean over seeds)", xlabel="optimizer step", ylabel="scale")
    skip_ax.set(title="skipped optimizer steps (cumulative, mean over seeds)", xlabel="optimizer step",
                ylabel="steps skipped")
    legend_below(fig, drawn_handles([scale_ax, skip_ax]))
    return _save(fig, path)


def diagnostics(exp: Experiment, styles: dict[str, Style], path: Path) -> Path | None:
    """The `DIAGNOSTICS` fields per parameter group, one panel each (those some step log holds): colour and line
    style = config, marker = group."""
    keys: dict[str, list[str]] = {}
    for records in exp.step_logs.values():
        for rec in records:
            for name, _ in DIAGNOSTICS:
                value = _lookup(rec, name)
                groups = [f"{name}/{g}" for g in value] if isinstance(value, dict) else [name] if value is not None else []
                keys.setdefault(name, [])
                keys[name] += [g for g in groups if g not in keys[name]]
    titles = dict(DIAGNOSTICS)
    panels = [(name, series_keys) for name, series_keys in keys.items() if series_keys]
    if not panels:
        return None
    groups = list(dict.fromkeys(key.removeprefix(name).lstrip("/") for name, series_keys in panels
                                for key in series_keys))
    marker_of = {g: GROUP_MARKERS[i % len(GROUP_MARKERS)] for i, g in enumerate(groups)}
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.5 * rows), squeeze=False, layout="constrained")
    drawn: set[str] = set()  # configs with a line in some panel
    for ax, (name, series_keys) in zip(axes.flat, panels):
        for config in exp.configs:
            for key in series_keys:
                steps, mean, _, _ = series(exp, config, key)
                if len(steps):
                    drawn.add(config)
                    _line(ax, steps, mean, styles[config], config, marker=marker_of[key.removeprefix(name).lstrip("/")],
                          markersize=3)
        ax.set(title=textwrap.fill(titles[name], 62) + "\n(mean over seeds)", xlabel="optimizer step",
               ylabel="ratio" if name == "update_fidelity" else "fraction")
        ax.title.set_fontsize(9)
        if all(not np.any(np.nan_to_num(line.get_ydata(), nan=1.0)) for line in ax.get_lines()):
            ax.text(0.5, 0.7, "every config reads 0 at every step", ha="center", va="center", fontsize=10,
                    transform=ax.transAxes, bbox=dict(facecolor="white", edgecolor="grey"))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    group_handles = {f"group {g}": Line2D([], [], color="black", marker=marker_of[g], linestyle="none")
                     for g in groups if g}
    configs = [c for c in exp.configs if c in drawn]
    legend_below(fig, {**_config_handles(configs, styles, marker=False), **group_handles})
    return _save(fig, path)
