"""analysis/: the per-experiment report and the cross-task comparison.

Synthetic results directories (rows and step logs shaped as run.py writes them: a classification sweep of 3
configs x 2 seeds plus a diverged fp16_naive and a CPU-skipped fp32_tf32_matmul, and an LM sweep of 4 configs x 1
seed) feed the tests of what the analysis computes and writes, each checked against an independent numpy/scipy
computation on the raw rows; one `slow` test runs real tiny sweeps of both experiments end to end.
"""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from analysis import analyze_experiment, compare_experiments, experiment_data
from dtype_bench import precision
from tiny_run import ENV, ROOT, small_cache, start

ANALYSIS = ROOT / "analysis"
LM_RUN = ROOT / "experiments" / "lm" / "run.py"
STEPS = ["--max_steps", "6", "--eval_steps", "3", "--timing_warmup_steps", "1", "--diverge_patience", "2"]
LM_SMALL = ["--preset", "tiny", "--n_layer", "1", "--n_head", "1", "--n_embd", "64", "--block_size", "32",
            "--batch_size", "4", "--gradient_accumulation_steps", "2", "--eval_sequences", "16",
            "--learning_rate", "3e-3", "--threads", "1"]
CLS_CONFIGS = ("fp32_baseline", "amp_bf16", "bf16_naive")
REPORTED_METRICS = ("samples_per_second", "peak_memory_gb", "micro_f1", "macro_f1", "precision_at_1",
                "precision_at_3", "precision_at_5", "rp_at_5", "ndcg_at_5")
LM_METRICS = ("tokens_per_second", "peak_memory_gb", "val_loss", "perplexity")


def analysis_modules():
    """analysis/ is the package analysis."""
    return (analyze_experiment, compare_experiments, experiment_data)


def raw_rows(results_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (results_dir / "results.jsonl").read_text().splitlines()]


def synthetic_run(task: str, config: str, seed: int, status: str, rng: np.random.Generator, steps: int = 6,
                  diverged_at: int = 4) -> tuple[dict, list[dict]]:
    """One results row and its step log as run.py writes them (CPU, `--preset tiny`, 6 steps)."""
    rid = f"{task}-{config}-seed{seed}-abcdef12"
    row = {"experiment": task, "run_id": rid, "config": config, "seed": seed, "status": status,
           "setup_fingerprint": "abcdef12" * 8, "precision": precision.get(config).to_record(),
           "train_config": {"preset": "tiny", "max_steps": steps, "seed": seed},
           "recipe_departures": {"head_bias_prior": {"value": True, "recipe": False},
                                 "max_steps": {"value": steps, "recipe": 5000}},
           "env": {"device": "cpu", "torch": "2.13.0", "torch_threads": 1}, "compiled": False,
           "optimizer_step_compiled": False, "peak_memory_kind": "cpu_peak_rss_per_phase"}
    if status == "skipped":
        return {**row, "reason": "TF32 matmuls need a CUDA GPU (this is a CPU run)"}, []
    log = []
    for step in range(1, steps + 1):
        bad = status == "diverged" and step >= diverged_at
        log.append({"step": step, "loss": float("nan") if bad else float(rng.uniform(0.5, 0.7)),
                    "grad_norm": float("nan") if bad else float(rng.uniform(0.1, 1)),
                    "max_abs_logit": float("nan") if bad else float(rng.uniform(5, 50))})
        if step % 3 == 0 and not bad:
            log.append({"step": step, "eval": "validation", "loss": float(rng.uniform(0.5, 0.7))})
    if status == "diverged":
        return {**row, "diverged_at_step": diverged_at + 1, "first_nonfinite_step": diverged_at, "steps": diverged_at,
                "nonfinite_origin": "optimizer:encoder", "nonfinite_origin_step": diverged_at}, log
    row.update(steps=steps, peak_memory_gb=float(rng.uniform(0.4, 0.6)), skipped_steps=0)
    if task == "classification":
        row["samples_per_second"] = float(rng.uniform(80, 120))
        row.update({m: float(rng.uniform(0.1, 0.4)) for m in REPORTED_METRICS[2:]})
        row["macro_f1_present_labels"] = float(rng.uniform(0.1, 0.4))
    else:
        row.update(tokens_per_second=float(rng.uniform(800, 1200)), val_loss=float(rng.uniform(5, 6)))
        row["perplexity"] = math.exp(row["val_loss"])
    return row, log


def write_results(folder: Path, runs: list[tuple[dict, list[dict]]]) -> Path:
    (folder / "logs").mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row, _ in runs))
    for row, log in runs:
        if log:
            (folder / "logs" / f"{row['run_id']}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return folder


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Path]:
    base, rng = tmp_path_factory.mktemp("analysis"), np.random.default_rng(0)
    cls = [synthetic_run("classification", c, s, "completed", rng) for c in CLS_CONFIGS for s in (0, 1)]
    cls += [synthetic_run("classification", "fp16_naive", 0, "diverged", rng),
            synthetic_run("classification", "fp32_tf32_matmul", 0, "skipped", rng)]
    lm = [synthetic_run("lm", c, 0, "completed", rng) for c in CLS_CONFIGS]
    lm.append(synthetic_run("lm", "fp16_naive", 0, "diverged", rng))
    return {"classification": write_results(base / "classification", cls), "lm": write_results(base / "lm", lm)}


@pytest.fixture(scope="module")
def real_results(tmp_path_factory) -> dict[str, Path]:
    """Real tiny sweeps: classification 3 configs x 2 seeds, a diverging fp16_naive and a CPU-skipped
    fp32_tf32_matmul; LM 4 configs x 1 seed (one thread per run, run side by side)."""
    base = tmp_path_factory.mktemp("real")
    cls_dir, lm_dir = base / "classification", base / "lm"
    lm_cache = base / "lm_cache"
    prepare_lm = subprocess.run([sys.executable, str(ROOT / "experiments" / "lm" / "prepare_data.py"), "--source",
                                 "synthetic", "--output_dir", str(lm_cache), "--tokenizer", "bpe:512",
                                 "--synthetic_docs", "60"], env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert prepare_lm.returncode == 0, prepare_lm.stderr[-2000:]
    procs = [subprocess.Popen([sys.executable, str(LM_RUN), *LM_SMALL, *STEPS, "--data_dir", str(lm_cache),
                               "--config", ",".join(CLS_CONFIGS + ("fp16_naive",)), "--seeds", "1",
                               "--output_dir", str(lm_dir)], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    cache = small_cache(base / "cls_cache")
    procs += [start(cache, cls_dir, *STEPS, *flags) for flags in (
        ["--config", ",".join(CLS_CONFIGS), "--seeds", "2"], ["--config", "fp16_naive", "--seed", "0"],
        ["--config", "fp32_tf32_matmul", "--seed", "0"])]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert len(raw_rows(lm_dir)) == 4, logs[0][-3000:]
    assert len(raw_rows(cls_dir)) == 8, "\n".join(log[-1500:] for log in logs[1:])
    return {"classification": cls_dir, "lm": lm_dir}


@pytest.fixture(scope="module")
def analysis(results, tmp_path_factory):
    analyze_experiment, _, _ = analysis_modules()
    return analyze_experiment.analyze(results["classification"], tmp_path_factory.mktemp("report"))


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["config"]: row for row in csv.DictReader(f)}


def test_summary_csv_matches_numpy_and_scipy(results, analysis):
    check_summary(raw_rows(results["classification"]), analysis.output_dir / "summary.csv")


def check_summary(rows: list[dict], path: Path) -> None:
    """summary.csv against numpy/scipy on the raw rows."""
    summary = read_csv(path)
    done = lambda config: sorted((r for r in rows if r["config"] == config and r["status"] == "completed"),  # noqa: E731
                                 key=lambda r: r["seed"])
    base = done("fp32_baseline")
    for config in CLS_CONFIGS:
        runs = done(config)
        assert len(runs) == 2 and summary[config]["completed"] == "2"
        for metric in REPORTED_METRICS:
            x = np.array([r[metric] for r in runs], dtype=float)
            lo, hi = scipy_stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
            got = {k: float(summary[config][f"{metric}_{k}"]) for k in ("mean", "std")}
            assert got["mean"] == pytest.approx(x.mean(), rel=1e-12), (config, metric)
            assert got["std"] == pytest.approx(x.std(ddof=1), rel=1e-9, abs=1e-15), (config, metric)
            if x.std() > 0:
                assert float(summary[config][f"{metric}_ci95_low"]) == pytest.approx(lo, rel=1e-9)
                assert float(summary[config][f"{metric}_ci95_high"]) == pytest.approx(hi, rel=1e-9)
            b = np.array([r[metric] for r in base], dtype=float)
            if metric in ("samples_per_second", "peak_memory_gb"):
                key = "speedup" if metric == "samples_per_second" else "ratio"
                assert float(summary[config][f"{metric}_{key}"]) == pytest.approx(x.mean() / b.mean(), rel=1e-12)
            else:
                diffs = x - b  # both sorted by seed: the seed-paired difference
                assert float(summary[config][f"{metric}_delta"]) == pytest.approx(diffs.mean(), abs=1e-12)
                if config != "fp32_baseline" and diffs.std() > 0:
                    dlo, dhi = scipy_stats.t.interval(0.95, 1, loc=diffs.mean(), scale=scipy_stats.sem(diffs))
                    assert float(summary[config][f"{metric}_delta_ci95_low"]) == pytest.approx(dlo, rel=1e-9)
                    assert float(summary[config][f"{metric}_delta_ci95_high"]) == pytest.approx(dhi, rel=1e-9)
    # partial results: counted, not averaged
    assert (summary["fp16_naive"]["diverged"], summary["fp16_naive"]["completed"]) == ("1", "0")
    assert summary["fp16_naive"]["micro_f1_mean"] == "" and summary["fp16_naive"]["missing_seeds"] == "1"
    assert summary["fp32_tf32_matmul"]["skipped"] == "1"


def test_pareto_fronts_are_the_non_dominated_means(analysis):
    summary = read_csv(analysis.output_dir / "summary.csv")
    for name, x, x_higher in (("throughput", "samples_per_second", True), ("memory", "peak_memory_gb", False)):
        points = {c: ((1 if x_higher else -1) * float(r[f"{x}_mean"]), float(r["micro_f1_mean"]))
                  for c, r in summary.items() if r["micro_f1_mean"]}
        expected = {c for c, (px, py) in points.items()
                    if not any(ox >= px and oy >= py and (ox, oy) != (px, py) for o, (ox, oy) in points.items())}
        front, dominated = analysis.fronts[name]
        assert set(front) == expected and set(dominated) == set(points) - expected


def test_report_reads_top_to_bottom_and_links_non_empty_pngs(analysis):
    report = (analysis.output_dir / "report.md").read_text()
    # the decision table, then its plots; the details after them
    sections = ["## Which config should I use", "## Plots", "## Summary", "## Stability", "## Pareto frontier",
                "## More plots", "## Caveats", "## Precision configs", "## Setup and environment", "## Every run"]
    assert [report.index(s) for s in sections] == sorted(report.index(s) for s in sections)
    assert report.index("relative_to_fp32.png") < report.index("## Summary")
    assert "**Measured on a CPU**" in report.split("## Which config should I use")[0]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert {"loss_curves.png", "relative_to_fp32.png", "pareto.png", "grad_norm.png", "max_logit.png"} <= set(links)
    for link in links:
        data = (analysis.output_dir / link).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, link
    # no config here scales the loss: said, not drawn empty
    assert "loss_scale.png" not in links and "no config in these results uses dynamic loss scaling" in report
    assert "not EURLEX57K" in report and "peak resident set size" in report
    assert "| train_config.max_steps | 6 |" in report and "| env.device | cpu |" in report
    # the config table: weights, head, autocast, loss scaling, weight update, moments, optimizer, compiled
    assert "| fp32_baseline | float32 | - | - | none | nearest | float32 | float32 | adamw | no / no |" in report
    # the setup lists what these runs change in the reference recipe, and says which macro-F1 is which
    assert "| head_bias_prior | True | False |" in report and "| max_steps | 6 | 5000 |" in report
    assert "macro-F1 (all labels): the plan's macro-F1" in report and "macro-F1 (labels with gold)" in report


def test_partial_results_are_explained_and_nan_is_kept(results, analysis):
    report = (analysis.output_dir / "report.md").read_text()
    (diverged,) = [r for r in raw_rows(results["classification"]) if r["config"] == "fp16_naive"]
    assert diverged["status"] == "diverged"
    assert f"| fp16_naive | diverged @ {diverged['diverged_at_step']} | not run |" in report
    assert "fp32_tf32_matmul** seed 0: skipped — TF32 matmuls need a CUDA GPU" in report
    assert "fp16_naive: seeds 1 not run" in report and "configs of the registry with no run:" in report
    from analysis import plots
    _, loss, _, _ = plots.series(analysis.exp, "fp16_naive", "loss")
    logged = [json.loads(line)["loss"] for line in
              (results["classification"] / "logs" / f"{diverged['run_id']}.jsonl").read_text().splitlines()
              if '"eval"' not in line]
    assert np.isnan(loss).sum() == sum(math.isnan(v) for v in logged) > 0  # the diverged steps stay NaN


def test_malformed_row_is_reported_not_skipped_silently(results, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(results["classification"], copy)
    with open(copy / "results.jsonl", "a") as f:
        f.write('{"config": "amp_bf16", "seed": 7, "status": "compl\n')
    proc = subprocess.run([sys.executable, str(ANALYSIS / "analyze_experiment.py"), "--results_dir", str(copy)],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(copy / "analysis" / "report.md")
    assert "results.jsonl:9: malformed line" in proc.stderr
    assert "results.jsonl:9: malformed line" in (copy / "analysis" / "report.md").read_text()


def test_missing_results_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert analyze_experiment.main(["--results_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no results.jsonl" in err and not list(tmp_path.iterdir())


def test_every_config_has_its_own_colour_and_family_and_8bit_style_come_from_the_precision_record():
    _, _, experiment_data = analysis_modules()
    style = experiment_data.styles({"x": {"weight_dtype": "float32", "autocast_dtype": "float16",
                                          "optimizer": "adamw_8bit"},
                                    "amp_bf16": {"weight_dtype": "float32", "autocast_dtype": None,
                                                 "optimizer": "adamw"}})
    assert style["x"].marker == "^" and style["x"].linestyle == "--" and style["x"].hatch  # fp16, 8-bit
    assert style["amp_bf16"].marker == "o" and style["amp_bf16"].linestyle == "-"  # its record says fp32
    every = experiment_data.styles({name: pc.to_record() for name, pc in precision.REGISTRY.items()})
    colours = [tuple(round(c, 3) for c in s.colour) for s in every.values()]
    assert len(set(colours)) == len(precision.REGISTRY) == 18


def test_cross_task_comparison_of_lm_and_classification_results(results, tmp_path):
    out = tmp_path / "comparison"
    assert compare_experiments.main(["--lm_results", str(results["lm"]), "--cls_results",
                                     str(results["classification"]), "--output_dir", str(out)]) == 0
    check_comparison(results, out)


@pytest.mark.slow
def test_real_tiny_sweeps_of_both_experiments_end_to_end(real_results, tmp_path):
    """The scripts as a user runs them, on rows and logs that run.py wrote."""
    proc = subprocess.run([sys.executable, str(ANALYSIS / "analyze_experiment.py"), "--results_dir",
                           str(real_results["classification"]), "--output_dir", str(tmp_path / "cls")],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_summary(raw_rows(real_results["classification"]), tmp_path / "cls" / "summary.csv")
    report = (tmp_path / "cls" / "report.md").read_text()
    assert "| fp16_naive | diverged @ " in report and "fp32_tf32_matmul** seed 0: skipped — TF32" in report
    out = tmp_path / "comparison"
    proc = subprocess.run([sys.executable, str(ANALYSIS / "compare_experiments.py"), "--lm_results",
                           str(real_results["lm"]), "--cls_results", str(real_results["classification"]),
                           "--output_dir", str(out)], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_comparison(real_results, out)


def check_comparison(results: dict[str, Path], out: Path) -> None:
    """comparison.json and report.md against scipy on the raw rows."""
    comparison = json.loads((out / "comparison.json").read_text())
    means = {}
    for task, metric, sign in (("lm", "val_loss", -1), ("classification", "micro_f1", 1)):
        rows = [r for r in raw_rows(results[task]) if r["status"] == "completed"]
        means[task] = {c: sign * np.mean([r[metric] for r in rows if r["config"] == c]) for c in CLS_CONFIGS}
    quality = comparison["correlations"]["quality"]
    rho, p = scipy_stats.spearmanr([means["lm"][c] for c in CLS_CONFIGS],
                                   [means["classification"][c] for c in CLS_CONFIGS])
    assert quality["metrics"] == {"lm": "val_loss", "classification": "micro_f1"} and quality["n_configs"] == 3
    # a constant metric (6-step runs can tie on micro-F1) has no rank correlation: NaN must be reported as NaN
    assert quality["rho"] == pytest.approx(rho, nan_ok=True) and quality["p_value"] == pytest.approx(p, nan_ok=True)
    lo, hi = quality["bootstrap_ci95"]
    if np.isnan(rho):  # nothing to resample either
        assert lo is None and hi is None
    else:
        assert -1 <= lo <= hi <= 1
    # the quality flips are exactly the pairs whose mean order (oriented: better = higher) differs between tasks
    expected = {frozenset((c1, c2)) for i, c1 in enumerate(CLS_CONFIGS) for c2 in CLS_CONFIGS[i + 1:]
                if np.sign(means["lm"][c1] - means["lm"][c2]) * np.sign(means["classification"][c1] -
                                                                        means["classification"][c2]) < 0}
    assert {frozenset(f["pair"]) for f in comparison["flips"] if f["role"] == "quality"} == expected
    verdicts = comparison["verdicts"]
    assert [k.split()[0] for k in verdicts] == ["H1", "H2", "H3", "H4"]
    assert all(v["verdict"] in ("supported", "refuted", "inconclusive") and v["reason"] for v in verdicts.values())
    # fp16_naive diverged in its one run of each task, as PLAN predicts, but one seed decides nothing
    assert verdicts["H2 stability"]["verdict"] == "inconclusive"
    assert verdicts["H2 stability"]["tasks"]["lm"]["claims"][0]["statistic"]["config_runs"]["diverged"] == 1
    assert all(v["verdict"] == "inconclusive" for v in verdicts.values())  # 1-2 seeds: nothing is decided
    assert "not run: amp_bf16_fp32_head" in verdicts["H1 output-layer precision"]["reason"]
    assert all(re.search(r"\d", r) for r in comparison["recommendations"]["universal"])
    report = (out / "report.md").read_text()
    # the first screen is the recommendations; the per-task hypotheses come after them
    assert report.splitlines()[2] == "## Recommendations"
    assert comparison["recommendations"]["universal"][0] in report.split("## ", 2)[1]
    assert report.index("## Recommendations") < report.index("## Hypotheses")
    assert "(lm/report.md)" in report and (out / "lm" / "report.md").exists()
    assert (out / "classification" / "report.md").exists() and "![config ranks in both tasks](ranks.png)" in report
    assert (out / "ranks.png").stat().st_size > 10_000


def synthetic_experiment(configs: list[str], seeds: int = 2, steps: int = 20):
    """Rows and step logs with every signal the plots draw, for configs of the registry (their precision records
    come from it): what a sweep of all 18 configs logs, without running it."""
    _, _, experiment_data = analysis_modules()
    rng = np.random.default_rng(0)
    rows, logs = [], {}
    for config in configs:
        for seed in range(seeds):
            rid = f"{config}-seed{seed}"
            rows.append({"config": config, "seed": seed, "status": "completed", "run_id": rid,
                         "samples_per_second": rng.uniform(300, 600), "peak_memory_gb": rng.uniform(0.3, 0.6),
                         "micro_f1": rng.uniform(0.1, 0.3)})
            per_group = lambda: {g: rng.uniform() for g in ("embeddings", "encoder", "head")}  # noqa: E731
            logs[rid] = [{"step": s, "loss": rng.uniform(0.01, 0.02), "grad_norm": rng.uniform(0.1, 1),
                          "max_abs_logit": rng.uniform(5, 50), "loss_scale": 2.0 ** 16, "skipped_steps": s // 10,
                          "update_fidelity": per_group(), "lost_update_frac": per_group(),
                          "grad_subnormal_frac": per_group(), "act_grad_subnormal_frac": per_group(),
                          "act_grad_zero_in_live_rows_frac": per_group(),
                          "moment_update_lost_frac": {"exp_avg": per_group(), "exp_avg_sq": per_group()}}
                         for s in range(1, steps + 1)]
            logs[rid] += [{"step": s, "eval": "validation", "loss": rng.uniform(0.01, 0.02)} for s in (10, 20)]
    return experiment_data.Experiment("classification", Path("synthetic"), rows, [], logs)


def draw_every_plot(exp, output_dir: Path, monkeypatch) -> dict[str, dict]:
    """Each figure the report draws, measured after layout: its legend's labels, whether the legend lies inside
    the figure and clear of every panel, and the panels' heights in inches."""
    output_dir.mkdir()
    _, _, experiment_data = analysis_modules()
    from analysis import plots, stats
    measured, save = {}, plots._save

    def measure_then_save(fig, path):
        fig.canvas.draw()
        box = fig.legends[0].get_window_extent() if fig.legends else None
        measured[path.stem] = {
            "labels": [t.get_text() for t in fig.legends[0].get_texts()] if box else [],
            "inside": box is not None and fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1
            and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1,
            "clear": box is not None and not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes),
            "panel_heights": [ax.get_window_extent().height / fig.dpi for ax in fig.axes]}
        return save(fig, path)

    style = experiment_data.styles(exp.precisions())
    summaries = stats.summarize(exp)
    quality, memory = experiment_data.METRIC_BY_KEY["micro_f1"], experiment_data.METRIC_BY_KEY["peak_memory_gb"]
    throughput = experiment_data.METRIC_BY_KEY["samples_per_second"]
    configs = [s.config for s in summaries]
    with monkeypatch.context() as patched:
        patched.setattr(plots, "_save", measure_then_save)
        plots.loss_curves(exp, style, output_dir / "loss_curves.png")
        plots.relative_bars(exp, summaries, style, throughput, memory, output_dir / "relative_to_fp32.png")
        plots.pareto(summaries, style, quality, [(throughput, configs[:2]), (memory, configs[:1])],
                     0.02, output_dir / "pareto.png")
        plots.step_signal(exp, style, "grad_norm", "grad norm", "norm", output_dir / "grad_norm.png")
        plots.step_signal(exp, style, "max_abs_logit", "max |logit|", "max |logit|", output_dir / "max_logit.png",
                          reference=(65504.0, "fp16 max"))
        plots.loss_scale(exp, style, output_dir / "loss_scale.png")
        plots.diagnostics(exp, style, output_dir / "diagnostics.png")
    return measured


def test_legends_name_all_18_configs_inside_the_figure_and_clear_of_the_panels(tmp_path, monkeypatch):
    """Layout only, so synthetic logs of the whole registry stand in for a sweep of it (the real-run tests above
    draw the same functions): one legend per figure, below the panels, naming every config once; the figure
    grows to hold it, so the panels are as tall as in a two-config sweep."""
    _, _, experiment_data = analysis_modules()
    registry = list(experiment_data.precision_registry.REGISTRY)
    assert len(registry) == 18
    everything = draw_every_plot(synthetic_experiment(registry), tmp_path / "all", monkeypatch)
    two = draw_every_plot(synthetic_experiment(["fp32_baseline", "amp_fp16"]), tmp_path / "two", monkeypatch)
    scaled = ["amp_fp16", "amp_fp16_8bit_adam"]
    expected = {"loss_curves": registry, "pareto": registry, "grad_norm": registry,
                "max_logit": registry + ["fp16 max"], "loss_scale": scaled,
                "diagnostics": registry + ["group embeddings", "group encoder", "group head"]}
    assert set(everything) == set(expected) | {"relative_to_fp32"} and everything["relative_to_fp32"]["labels"] == []
    for name, labels in expected.items():
        figure = everything[name]
        assert figure["labels"] == labels, name
        assert figure["inside"] and figure["clear"], (name, figure)
        for tall, short in zip(figure["panel_heights"], two[name]["panel_heights"]):
            assert tall == pytest.approx(short, rel=0.05), (name, figure["panel_heights"], two[name]["panel_heights"])


def test_analysis_and_comparison_never_write_into_a_folder_that_is_not_ours(tmp_path):
    """Refused before anything is read or written."""
    from dtype_bench.io import FolderRefused

    analyze_experiment, compare_experiments, _ = analysis_modules()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("thesis")
    for call in (lambda: analyze_experiment.analyze(tmp_path / "no-results", mine),
                 lambda: compare_experiments.compare(tmp_path / "a", tmp_path / "b", mine)):
        with pytest.raises(FolderRefused, match="holds no analysis.json of ours"):
            call()
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]


def _analyze(results_dir: Path, output_dir: Path) -> None:
    analyze_experiment.analyze(results_dir, output_dir)


def test_a_killed_analysis_leaves_the_previous_one_whole(results, tmp_path):
    """The analysis is built aside and swapped in whole: killed just before the swap, the folder still holds the
    previous analysis file for file; the next analysis removes what the killed one left and replaces it."""
    from interrupt import killed_at_rename

    out = tmp_path / "analysis"
    analyze_experiment.analyze(results["classification"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    killed_at_rename(_analyze, (results["lm"], out), r"^\.analysis\.tmp-")
    assert not out.exists() and len(list(tmp_path.glob(".analysis.old-*"))) == 1  # killed between the renames
    analyze_experiment.analyze(results["classification"], out)  # puts the previous one back first, then replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis"]
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def test_quality_margin_and_the_tasks_compared_are_checked(results, tmp_path, capsys):
    for margin in ("inf", "1e9", "nan", "-5", "0"):
        assert analyze_experiment.main(["--results_dir", str(results["classification"]),
                                        "--quality_margin", margin]) == 2
        assert "--quality_margin must be in (0, 1)" in capsys.readouterr().err
    same = ["--lm_results", str(results["classification"]), "--cls_results", str(results["classification"]),
            "--output_dir", str(tmp_path / "cmp")]
    assert compare_experiments.main(same) == 2
    assert "holds results of the classification experiment, not lm" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_rows_flushed_entirely_are_counted_against_the_fp32_baseline_of_the_same_seed_and_step():
    """A row of activation gradients that flushed to zero entirely is structural to the run that logged it; the
    analysis counts it against fp32's structural rows. From element counts: 1,000 elements, 400 structural in
    fp32; in the fp16 run 900 are in zero rows and 20 of the other 100 are zero: (500 + 20) / 600 flushed."""
    _, _, experiment_data = analysis_modules()
    rows, logs = [], {}
    for config, structural, zeros in (("fp32_baseline", 400 / 1000, 0.0),
                                      ("amp_fp16_no_loss_scaling", 900 / 1000, 20 / 100),
                                      ("amp_fp16", 400 / 1000, 1 / 600)):
        for seed in (0, 1):
            rid = f"{config}-{seed}"
            rows.append({"config": config, "seed": seed, "status": "completed", "run_id": rid})
            logs[rid] = [{"step": 1, "act_grad_structural_zero_frac": {"encoder": structural},
                          "act_grad_zero_in_live_rows_frac": {"encoder": zeros}}, {"step": 2, "loss": 1.0}]
    rows.append({"config": "amp_bf16", "seed": 5, "status": "completed", "run_id": "amp_bf16-5"})  # no fp32 seed 5
    logs["amp_bf16-5"] = [{"step": 1, "act_grad_structural_zero_frac": {"encoder": 0.5},
                           "act_grad_zero_in_live_rows_frac": {"encoder": 0.0}}]
    exp = experiment_data.Experiment("classification", Path("synthetic"), rows, [], logs)
    experiment_data.add_activation_flush_vs_baseline(exp)
    flushed = {rid: [r.get(experiment_data.ACT_GRAD_FLUSHED) for r in records] for rid, records in logs.items()}
    assert flushed["amp_fp16_no_loss_scaling-1"][0]["encoder"] == pytest.approx(520 / 600)
    assert flushed["amp_fp16-0"][0]["encoder"] == pytest.approx(1 / 600)
    assert flushed["fp32_baseline-0"][0]["encoder"] == 0.0
    assert flushed["amp_fp16-0"][1] is None and flushed["amp_bf16-5"] == [None]  # nothing to compare with
