"""What a reader takes in at a glance: one-seed differences say they have no interval (and are paired when the
seeds match), a score near its floor is flagged, and the Pareto plot's quality axis spans fp32's margin, with
every point's name inside the panel and clear of the others."""
from __future__ import annotations

import json

import pytest

from analysis import analyze_experiment, plots, stats
from analysis.experiment_data import METRIC_BY_KEY, load_experiment, styles
from analysis.report import fmt_difference
from dtype_bench import precision

SEEDS = (0, 1, 2)
MICRO_F1 = {"fp32_baseline": (0.500, 0.510, 0.520), "amp_bf16": (0.501, 0.511, 0.519),
            "bf16_naive": (0.003, 0.004, 0.002)}  # bf16_naive: a model that predicts almost nothing right
SAMPLES_PER_SECOND = {"fp32_baseline": 100.0, "amp_bf16": 150.0, "bf16_naive": 140.0}


def row(config: str, seed: int) -> dict:
    return {"experiment": "classification", "run_id": f"classification-{config}-seed{seed}-abcdef12",
            "config": config, "seed": seed, "status": "completed", "setup_fingerprint": "abcdef12" * 8,
            "samples_per_second": SAMPLES_PER_SECOND[config] + seed, "peak_memory_gb": 1.0 + 0.01 * seed,
            "peak_memory_kind": "cuda_max_allocated", "micro_f1": MICRO_F1[config][seed],
            "macro_f1": MICRO_F1[config][seed] / 10, "steps": 10, "compiled": False,
            "precision": precision.get(config).to_record(), "train_config": {"preset": "tiny", "max_steps": 10},
            "env": {"device": "cuda:0", "torch": "2.13.0"}, "dtypes": {"body_params": ["float32"]}}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    (folder / "results.jsonl").write_text("".join(json.dumps(row(c, s)) + "\n" for c in MICRO_F1 for s in SEEDS))
    return folder


def test_a_one_seed_difference_on_the_same_seed_is_paired_and_says_it_has_no_interval():
    same = stats.difference({0: 0.5}, {0: 0.4})
    assert same.paired and same.n == 1 and same.lo is None
    assert fmt_difference(same) == "+0.1 (n=1, no interval)"
    assert not stats.difference({0: 0.5}, {1: 0.4}).paired  # different seeds: different data order and init
    comparison = stats.compare({0: 0.5}, {0: 0.4}, margin=0.01)
    assert comparison.paired and "n=1, no interval" in comparison.text(0.05) and "none" not in comparison.text(0.05)


def test_one_seed_reads_n_1_and_never_a_missing_spread(tmp_path):
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row(c, 0)) + "\n" for c in MICRO_F1))
    report = (analyze_experiment.analyze(tmp_path, tmp_path / "analysis").output_dir / "report.md").read_text()
    assert "± -" not in report and "unpaired" not in report
    assert "| 0.501 (n=1) |" in report and "+0.001 (n=1, no interval)" in report


def test_a_score_near_its_floor_is_flagged_where_it_is_read(results_dir):
    report = (analyze_experiment.analyze(results_dir, results_dir / "analysis").output_dir / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| bf16_naive")
            or line.startswith("| amp_bf16 ")}
    flagged = [line for line in report.splitlines() if "near the floor: says little" in line]
    # the decision table, the summary and the all-metrics table flag bf16_naive (micro-F1 0.003, macro-F1 0.0003)
    assert len(flagged) == 3 and all(line.startswith("| bf16_naive |") for line in flagged)
    assert "near the floor" not in rows["amp_bf16"]


def test_pareto_quality_axis_spans_fp32s_margin_and_names_do_not_collide(results_dir, monkeypatch):
    exp = load_experiment(results_dir)
    summaries = [s for s in stats.summarize(exp) if s.config != "bf16_naive"]  # two configs 0.1% apart
    quality, memory = METRIC_BY_KEY["micro_f1"], METRIC_BY_KEY["peak_memory_gb"]
    throughput = METRIC_BY_KEY["samples_per_second"]
    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or path)
    plots.pareto(summaries, styles(exp.precisions()), quality, [(throughput, ["amp_bf16"]), (memory, [])], 0.02,
                 results_dir / "pareto.png")
    fig, = saved
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    fp32 = sum(MICRO_F1["fp32_baseline"]) / 3
    for ax in fig.axes[:2]:
        low, high = ax.get_ylim()
        assert low < 0.98 * fp32 and high > 1.02 * fp32  # equivalent configs drawn inside one band, not far apart
        assert high - low < 0.1 * fp32  # and no wider than the band and the points need
        names = [t for t in ax.texts if t.get_text() in MICRO_F1]
        assert sorted(t.get_text() for t in names) == ["amp_bf16", "fp32_baseline"]
        boxes = [t.get_window_extent(renderer) for t in names]
        frame = ax.get_window_extent(renderer)
        assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
        assert not boxes[0].overlaps(boxes[1])


def test_coinciding_curves_are_drawn_widest_first():
    widths = plots.nested_widths(["fp32_baseline", "amp_bf16", "bf16_naive"])
    assert list(widths.values()) == sorted(widths.values(), reverse=True) and len(set(widths.values())) == 3
    assert plots.nested_widths(["fp32_baseline"]) == {"fp32_baseline": 3.5}
