"""Parquet outputs (pandas and `datasets` read them back) and the report's first screen."""
from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from dtype_bench import precision
from analysis import analyze_experiment

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"
SEEDS = (0, 1, 2)  # the verdicts need 3 runs per config
SAMPLES_PER_SECOND = {"fp32_baseline": (100.0, 110.0, 105.0), "amp_bf16": (150.0, 160.0, 155.0),
                      "fp16_naive": (120.0, 125.0, 122.0)}
# amp_bf16 within ±0.002 of fp32 seed for seed (equivalent within the ±2% margin); fp16_naive far below
MICRO_F1 = {"fp32_baseline": (0.50, 0.51, 0.52), "amp_bf16": (0.501, 0.511, 0.519), "fp16_naive": (0.20, 0.21, 0.205)}


def row(config: str, seed: int) -> dict:
    return {"experiment": "classification", "run_id": f"classification-{config}-seed{seed}-abcdef12",
            "config": config, "seed": seed, "status": "completed", "setup_fingerprint": "abcdef12" * 8,
            "samples_per_second": SAMPLES_PER_SECOND[config][seed], "peak_memory_gb": 1.0 + 0.1 * seed,
            "peak_memory_kind": "cuda_max_allocated", "micro_f1": MICRO_F1[config][seed], "macro_f1": float("nan"),
            "precision_at_1": 0.6, "steps": 10, "compiled": False,
            "precision": precision.get(config).to_record(), "train_config": {"preset": "tiny", "max_steps": 10},
            "env": {"device": "cuda:0", "torch": "2.13.0"}, "dtypes": {"body_params": ["float32"]}}


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    results_dir = tmp_path_factory.mktemp("results")
    rows = [row(c, s) for c in SAMPLES_PER_SECOND for s in SEEDS]
    skipped = {k: v for k, v in row("fp32_baseline", 0).items() if k not in ("samples_per_second", "micro_f1")}
    rows.append({**skipped, "config": "fp32_tf32_matmul", "run_id": "classification-fp32_tf32_matmul-seed0-abcdef12",
                 "status": "skipped", "reason": "no GPU", "precision": precision.get("fp32_tf32_matmul").to_record()})
    (results_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return analyze_experiment.analyze(results_dir, results_dir / "analysis")


def test_runs_parquet_has_one_row_per_run_readable_by_pandas_and_datasets(analysis):
    pandas = pytest.importorskip("pandas")
    datasets = pytest.importorskip("datasets")
    path = analysis.output_dir / "runs.parquet"
    frame = pandas.read_parquet(path)
    assert len(frame) == 10 and set(frame["status"]) == {"completed", "skipped"}
    by_run = frame.set_index("run_id")
    assert by_run.loc["classification-amp_bf16-seed1-abcdef12", "micro_f1"] == 0.511
    assert by_run.loc["classification-amp_bf16-seed1-abcdef12", "precision.autocast_dtype"] == "bfloat16"
    assert by_run.loc["classification-fp32_tf32_matmul-seed0-abcdef12", "reason"] == "no GPU"
    assert frame["macro_f1"].isna().all() and str(frame["train_config.max_steps"].dtype) == "int64"
    assert json.loads(by_run.loc["classification-amp_bf16-seed1-abcdef12", "dtypes.body_params"]) == ["float32"]
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert loaded.num_rows == 10 and "precision.weight_dtype" in loaded.column_names


def test_summary_parquet_holds_the_csvs_numbers(analysis):
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_parquet(analysis.output_dir / "summary.parquet").set_index("config")
    with open(analysis.output_dir / "summary.csv", newline="") as f:
        csv_rows = {r["config"]: r for r in csv.DictReader(f)}
    assert set(frame.index) == set(csv_rows)
    for config, values in csv_rows.items():
        for key in ("micro_f1_mean", "samples_per_second_mean", "micro_f1_ci95_low"):
            if values[key]:
                assert frame.loc[config, key] == pytest.approx(float(values[key]), rel=1e-12), (config, key)
    assert frame.loc["amp_bf16", "micro_f1_mean"] == pytest.approx(statistics.fmean(MICRO_F1["amp_bf16"]))


def test_the_first_screen_says_which_config_to_use_with_its_evidence(analysis):
    report = (analysis.output_dir / "report.md").read_text()
    first = report.index("## Which config should I use")
    assert first < report.index("## Summary") and first < 1500  # right under the title and sources
    table = [line for line in report[first:report.index("\n## ", first + 1)].splitlines() if line.startswith("| ")]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[1:]}
    assert [line.split("|")[1].strip() for line in table[1:3]] == ["amp_bf16", "fp32_baseline"]  # ok, fastest first
    speed = statistics.fmean(SAMPLES_PER_SECOND["amp_bf16"]) / statistics.fmean(SAMPLES_PER_SECOND["fp32_baseline"])
    assert cells["amp_bf16"][0] == "equivalent within ±2% (TOST)" and cells["amp_bf16"][2] == f"{speed:.3g}"
    # the seed-paired difference relative to fp32's mean, with the interval of the Holm step that decided it: two
    # comparisons are tested (amp_bf16, fp16_naive), amp_bf16's TOST p is the smaller, so its step is at alpha / 2
    difference = re.match(r"Δ ([-+][\d.]+)% \[([-+][\d.]+)%, ([-+][\d.]+)%\] \(95% CI\), TOST Holm p=([\d.e-]+) "
                          r"\(paired t, n=3\)", cells["amp_bf16"][1])
    diffs = np.subtract(MICRO_F1["amp_bf16"], MICRO_F1["fp32_baseline"])
    mean = statistics.fmean(MICRO_F1["fp32_baseline"])
    low, high = scipy_stats.t.interval(1 - 2 * 0.025, len(diffs) - 1, loc=diffs.mean(), scale=scipy_stats.sem(diffs))
    assert [float(x) / 100 for x in difference.groups()[:3]] == pytest.approx(
        [diffs.mean() / mean, low / mean, high / mean], rel=0.01, abs=1e-4)
    margin = 0.02 * mean
    tost = max(scipy_stats.ttest_1samp(diffs, -margin, alternative="greater").pvalue,
               scipy_stats.ttest_1samp(diffs, margin, alternative="less").pvalue)
    assert float(difference.group(4)) == pytest.approx(2 * tost, rel=0.05)  # Holm: 2 x the smaller p
    assert cells["fp16_naive"][0].startswith("quality loss: -59.")
    assert cells["fp32_tf32_matmul"][0] == "not run here: no GPU"  # the row's reason, on the first screen
    assert cells["fp32_tf32_matmul"][-1] == "0/1 completed, 1 skipped"
    assert "(relative_to_fp32.png)" in report[first:report.index("## Summary")]
    # the first screen states the decision rule and the error control
    screen = " ".join(report[first:report.index("\n## ", first + 1)].split())
    assert "Holm's step-down correction" in screen and "Here: 2 comparisons in the family" in screen
    assert "no quality loss" not in report


def test_the_report_states_each_hypothesis_in_plan_words_with_its_verdict_and_tests(analysis):
    """The per-experiment report carries H1-H4 as PLAN.md states them, each with a verdict and its
    claims' tests; the other experiment's claims are named, not evaluated on no data."""
    report = (analysis.output_dir / "report.md").read_text()
    section = report[report.index("## Hypotheses"):report.index("\n## ", report.index("## Hypotheses") + 1)]
    plan = " ".join((ANALYSIS.parent / "experiments" / "classification" / "PLAN.md").read_text().split())
    headers = re.findall(r"^### (H\d) [^:]+: \*\*(\w+)\*\*$", section, flags=re.M)
    assert [h for h, _ in headers] == ["H1", "H2", "H3", "H4"]
    assert all(verdict in ("supported", "refuted", "inconclusive") for _, verdict in headers)
    for block in re.split(r"^### ", section, flags=re.M)[1:]:
        statement = block.split("\n\n")[1]
        assert " ".join(statement.split()) in plan  # PLAN.md's words, wrapped differently there
        assert "- classification: **" in block and re.search(r"test|Fisher|TOST", block)
    assert "- lm (reported beside the verdict, not deciding it): no lm results in this report" in section
    # fp16_naive (3 runs, all completed here) vs amp_bf16: nothing diverged, so H2 cannot be supported
    assert dict(headers)["H2"] != "supported"


def test_a_cpu_report_names_the_configs_this_cpu_did_not_run_before_the_table(tmp_path):
    slow = ("float16 matmuls measured 40.9x slower than float32 on this CPU (emulated, not native; 256x256 "
            "calibration), above --max_cpu_slowdown 4")
    rows = [{**row(c, s), "env": {"device": "cpu", "torch": "2.13.0"}} for c in ("fp32_baseline", "amp_bf16")
            for s in SEEDS]
    rows += [{**row("fp16_naive", s), "env": {"device": "cpu"}, "status": "skipped",
              "reason": f"{slow}; pass --max_cpu_slowdown none to measure it anyway"} for s in SEEDS]
    for r in rows[-3:]:
        del r["samples_per_second"], r["micro_f1"]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    analyze_experiment.analyze(tmp_path, tmp_path / "analysis")
    report = (tmp_path / "analysis" / "report.md").read_text()
    before_table = report.split("## Which config should I use")[0]
    assert f"Not run on this CPU: `fp16_naive` ({slow})" in before_table
    assert f"| fp16_naive | not run here: {slow} |" in report


def test_emulated_runs_are_judged_on_quality_and_their_speed_is_neither_compared_nor_ranked(tmp_path):
    """amp_bf16 with emulated matmuls: equivalent to fp32 on micro-F1 as with its measured speed, but no speed-up or
    memory ratio, named as equivalent and unranked in the findings, its speed in the runs table marked emulated."""
    rows = [{**row(c, s), "env": {"device": "cpu", "torch": "2.13.0"}} for c in ("fp32_baseline", "amp_bf16")
            for s in SEEDS]
    for r in rows[3:]:
        r["matmuls_emulated"] = True
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    analysis = analyze_experiment.analyze(tmp_path, tmp_path / "analysis")
    report = (tmp_path / "analysis" / "report.md").read_text()
    assert "Matmuls emulated in fp32 (`--emulate_slow_matmuls`, this CPU has no native ones) for `amp_bf16`" in report
    (line,) = [x for x in report.splitlines() if x.startswith("| amp_bf16 | equivalent within ±2%")]
    assert line.endswith("| - | - | 3/3 completed |"), line  # no speed-up, no memory ratio
    assert any("not ranked by speed" in f and "matmuls emulated" in f and "**amp_bf16**" in f
               for f in analyze_experiment.findings(analysis))
    assert "| amp_bf16 | 1 | completed | 160 (emulated) |" in report


def test_a_run_recorded_twice_is_a_note_unless_the_first_row_was_a_skip(tmp_path):
    from analysis.experiment_data import load_experiment

    skipped = {**row("amp_bf16", 0), "status": "skipped", "reason": "emulated"}
    del skipped["micro_f1"]
    rows = [row("fp32_baseline", 0), row("fp32_baseline", 0), skipped, row("amp_bf16", 0)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    exp = load_experiment(tmp_path)
    assert [p for p in exp.problems if "more than once" in p] == [
        "fp32_baseline seed 0: recorded more than once; the last row is used"]
    assert [r["status"] for r in exp.runs("amp_bf16")] == ["completed"]  # the later training supersedes the skip


def test_an_unstable_verdict_names_where_its_runs_first_went_non_finite():
    from analysis.experiment_data import Experiment

    rows = [row("fp32_baseline", s) for s in SEEDS]
    logs = {}
    for s in SEEDS:
        rid = f"classification-fp16_naive-seed{s}-abcdef12"
        rows.append({**row("fp16_naive", s), "run_id": rid, "status": "diverged", "diverged_at_step": 2})
        origin = "optimizer:embeddings" if s else "forward:head"
        logs[rid] = [{"step": 1, "loss": 0.1, "nonfinite_origin": origin}, {"step": 2, "loss": float("nan")}]
    exp = Experiment("classification", Path("results"), rows, [], logs)
    assert analyze_experiment.origins_summary(exp, "fp16_naive") == (
        "; first non-finite value: optimizer:embeddings (step 1) in 2 of 3 diverged runs")
    assert analyze_experiment.origins_summary(exp, "fp32_baseline") == ""
