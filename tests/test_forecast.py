"""The forecast: a forecast run is the full run's first steps, its rows live apart, the command prints its table,
and the predictor is fitted without the config it predicts."""
from __future__ import annotations

import json
import math

import pytest

import tiny_run
from analysis import forecast
from analysis.experiment_data import load_experiment
from dtype_bench import cli
from experiments.classification import run as cls_run

SHORT = ["--max_steps", "20", "--eval_steps", "10", "--diagnostics_every", "5", "--log_every", "1",
         "--timing_warmup_steps", "2"]


def flags(cache, out, *more):
    return [*tiny_run.SMALL, "--data_dir", str(cache), "--output_dir", str(out), *SHORT, *more]


def training_lines(out, row):
    return tiny_run.without_timing([r for r in map(json.loads, tiny_run.step_log(out, row["run_id"]))
                                    if "eval" not in r])


def test_forecast_run_is_the_first_fraction_of_the_full_run_and_writes_apart(small_cache_dir, tmp_path):
    out = tmp_path / "sweep"
    assert cls_run.main(flags(small_cache_dir, out, "--config", "bf16_naive", "--forecast", "0.25")) == 0
    fdir = tmp_path / "sweep-forecast"
    assert not out.exists()  # the full sweep's folder is left untouched (absent: nothing claimed it)
    [frow] = tiny_run.rows(fdir)
    assert frow["status"] == "completed" and frow["steps"] == 5  # ceil(0.25 x 20)
    assert frow["train_config"]["forecast"] == 0.25
    evals = [json.loads(x) for x in tiny_run.step_log(fdir, frow["run_id"]) if '"eval"' in x]
    assert [e["step"] for e in evals] == [5]  # the validation at the stop

    # a full sweep afterwards into the same output_dir runs (not refused, not mistaken for done)
    assert cls_run.main(flags(small_cache_dir, out, "--config", "bf16_naive")) == 0
    [row] = tiny_run.rows(out)
    assert row["steps"] == 20 and row["run_id"] != frow["run_id"]
    assert row["setup_fingerprint"] != frow["setup_fingerprint"]
    assert len(tiny_run.rows(fdir)) == 1
    full, short = training_lines(out, row), training_lines(fdir, frow)
    assert [r["step"] for r in short] == [1, 2, 3, 4, 5]
    assert short == full[:5]  # loss, lr (the same schedule over max_steps), grad norm and diagnostics, bit for bit
    assert full[5]["lr"] != full[4]["lr"]


def test_forecast_fraction_is_checked():
    with pytest.raises(ValueError, match="--forecast"):
        cls_run.TrainConfig(preset="tiny", model_name="tiny", forecast=1.5)


def test_forecast_command_adds_fp32_and_prints_the_table(small_cache_dir, tmp_path, capsys):
    out = tmp_path / "cls"
    code = cli.main(["forecast", "classification", *flags(small_cache_dir, out, "--config", "amp_bf16")])
    assert code == 0
    printed = capsys.readouterr().out
    rows = tiny_run.rows(tmp_path / "cls-forecast")
    assert sorted(r["config"] for r in rows) == ["amp_bf16", "fp32_baseline"]
    assert all(r["steps"] == 2 for r in rows)  # the default fraction, 0.1 of 20
    table = printed[printed.index("forecast from"):]
    assert "amp_bf16" in table and "recommendation:" in table and "cost:" in table
    assert not out.exists()
    record = json.loads(forecast.MODEL_FILE.read_text())
    assert ("did NOT beat" in table) == (not record["beats_baselines"])


def _run(config, seed, lost, diverged=False):
    feats = {f: 0.0 for f in forecast.FEATURES}
    feats["lost_updates"] = lost
    return forecast.ForecastRun(config, seed, diverged, feats, {f: "" for f in forecast.FEATURES}, None, None,
                                None, None, None)


def test_fit_orders_by_the_evidence_and_a_divergence_is_certain():
    runs = [_run("a", s, 0.0 + 0.01 * s) for s in range(3)] + [_run("b", s, 0.5 + 0.01 * s) for s in range(3)]
    model = forecast.fit(runs, {"a": "equivalent", "b": "quality loss"})
    assert model.p_equivalent(_run("x", 0, 0.0)) > 0.5 > model.p_equivalent(_run("x", 0, 0.6))
    assert model.p_equivalent(_run("x", 0, 0.0, diverged=True)) == 0.0
    assert forecast.predicted_outcome(0.9, diverged=True) == "diverges"
    assert forecast.predicted_outcome(0.4, diverged=False) == "quality loss"
    assert forecast.Model.from_record(model.to_record()) == model


def test_leave_one_config_out_never_sees_the_predicted_config():
    runs = ([_run("a", s, 0.01 * s) for s in range(3)] + [_run("b", s, 0.5 + 0.01 * s) for s in range(3)]
            + [_run("c", s, 0.3 + 0.01 * s) for s in range(3)] + [_run("d", s, 0.02 * s) for s in range(3)])
    labels = {"a": "equivalent", "b": "quality loss", "c": "quality loss", "d": "equivalent"}
    before = forecast.leave_one_config_out(runs, labels)
    after = forecast.leave_one_config_out(runs, {**labels, "c": "equivalent"})
    assert all(before["c", s] == after["c", s] for s in range(3))  # c's own label cannot move its prediction
    assert any(before["a", s] != after["a", s] for s in range(3))  # but it is used for the others


def test_scores():
    s = forecast.score([1.0, 0.0, 0.75, 0.25], [True, True, True, False])
    assert s.accuracy == 0.75 and math.isclose(s.brier, (0 + 1 + 0.0625 + 0.0625) / 4)
    assert sum(n for _, n, _, _ in s.calibration) == 4


def test_a_model_fitted_elsewhere_is_scored_as_it_is_and_is_no_baseline():
    """`predictions` with a shipped model: its P for each run is the model's own (not refitted on these runs),
    beside the forecast's leave-one-config-out; `beats_baselines` compares the forecast with the two baselines
    only."""
    elsewhere = forecast.fit([_run("p", s, 0.01 * s) for s in range(3)] + [_run("q", s, 0.9) for s in range(3)],
                             {"p": "equivalent", "q": "quality loss"})
    runs = [_run("a", s, 0.01 * s) for s in range(3)] + [_run("b", s, 0.5 + 0.01 * s) for s in range(3)]
    labels = {"a": "equivalent", "b": "quality loss"}
    preds = forecast.predictions(runs, labels, {}, True, shipped=elsewhere)
    assert preds["shipped"] == {(r.config, r.seed): elsewhere.p_equivalent(r) for r in runs}
    assert preds["shipped"] != preds["forecast"] and set(preds) == {"forecast", "val_at_stop", "amp_fine", "shipped"}
    ys = [labels[r.config] == "equivalent" for r in runs]
    scores = {m: forecast.score([p[r.config, r.seed] for r in runs], ys) for m, p in preds.items()}
    perfect = forecast.score([float(y) for y in ys], ys)
    v = forecast.Validation({}, runs, preds, {**scores, "forecast": perfect, "shipped": perfect}, elsewhere, 0, 0,
                            elsewhere.fitted_on)
    assert v.beats_baselines  # a perfect shipped model does not stand in the forecast's way
    assert not forecast.Validation({}, runs, preds, {**scores, "val_at_stop": perfect, "forecast": perfect},
                                   elsewhere, 0, 0, []).beats_baselines  # a tie on Brier is not a win


def test_the_caveat_names_the_validation_and_the_shipped_models_other_tasks():
    record = {"beats_baselines": False, "validation_summary": "on X", "out_of_task": ["task Y: accuracy 0.5"]}
    text = forecast.caveat(record)
    assert "did NOT beat" in text and "on X; as fitted, on task Y: accuracy 0.5" in text
    assert forecast.caveat({**record, "beats_baselines": True}) is None
    assert "as fitted" not in forecast.caveat({"beats_baselines": False})


def test_defaults_of_the_command():
    argv = forecast._with_defaults(["--config", "amp_bf16"])
    assert argv == ["--config", "fp32_baseline,amp_bf16", "--forecast", str(forecast.DEFAULT_FRACTION)]
    assert forecast._with_defaults(["--config", "core", "--forecast", "0.2"])[-1] == "0.2"


def test_marks_say_where_the_forecast_was_wrong():
    rows = [{"config": "a", "outcome": "equivalent", "p": 0.9}, {"config": "b", "outcome": "quality loss", "p": 0.7},
            {"config": "c", "outcome": "equivalent", "p": 0.6}]
    labels = {"a": ("quality loss", "quality loss: -3%"), "b": ("quality loss", "quality loss: -4%"),
              "c": (None, "undecided")}
    marks = forecast.marks(rows, labels)
    assert [m["wrong"] for m in marks] == [True, False, False]
    assert forecast.marks_markdown(marks).count("**forecast wrong**") == 1


def test_report_shows_the_forecast_beside_the_full_runs(small_cache_dir, tmp_path, capsys):
    from analysis import analyze_experiment

    out = tmp_path / "r"
    assert cls_run.main(flags(small_cache_dir, out, "--config", "fp32_baseline,bf16_naive", "--forecast", "0.25")) == 0
    printed = capsys.readouterr().out  # run.py --forecast prints the forecast's table itself
    assert "recommendation:" in printed[printed.index("forecast from"):]
    assert cls_run.main(flags(small_cache_dir, out, "--config", "fp32_baseline,bf16_naive")) == 0
    analysis = analyze_experiment.analyze(out)
    report = (analysis.output_dir / "report.md").read_text()
    section = report[report.index("## Forecast vs measured"):]
    assert "| bf16_naive |" in section.split("\n## ")[0]


def test_lm_forecast_run_is_the_first_fraction_of_the_full_run(tmp_path):
    import test_lm
    from experiments.lm import run as lm_run

    cache = test_lm.prepare_data.prepare("synthetic", tmp_path / "cache", tokenizer="bpe:512", val_fraction=0.1,
                                         synthetic_docs=60)
    base = [*test_lm.SMALL, "--config", "bf16_naive", "--max_steps", "12", "--data_dir", str(cache),
            "--output_dir", str(tmp_path / "lm")]
    assert lm_run.main([*base, "--forecast", "0.25"]) == 0
    assert lm_run.main(base) == 0
    [frow], [row] = test_lm.rows(tmp_path / "lm-forecast"), test_lm.rows(tmp_path / "lm")
    assert frow["steps"] == 3 and row["steps"] == 12
    short = tiny_run.without_timing(test_lm.step_log(tmp_path / "lm-forecast", frow))
    full = tiny_run.without_timing(test_lm.step_log(tmp_path / "lm", row))
    assert [r for r in short if "eval" not in r] == [r for r in full if "eval" not in r][:3]
    assert [r["step"] for r in short if "eval" in r] == [3]


def test_the_full_run_estimate_counts_an_emulated_runs_time_set_aside_by_the_analysis():
    """The analysis moves an emulated run's times out of its row (`emulated_costs`); what the full run would cost
    here still scales them: 10 s of training for 10 of 100 steps, 1 s per evaluation (1 done, 5 in full), 4 s of
    set-up -> 4 + 100 + 5."""
    row = {"wall_seconds": 15.0, "evaluations": 1, "train_config": {"max_steps": 100, "eval_steps": 20, "forecast": 0.1},
           "steps": 10}
    plain = {**row, "train_wall_seconds": 10.0, "eval_wall_seconds": 1.0}
    emulated = {**row, "emulated_costs": {"train_wall_seconds": 10.0, "eval_wall_seconds": 1.0}}
    assert forecast.full_run_seconds(plain) == pytest.approx(109.0)
    assert forecast.full_run_seconds(emulated) == pytest.approx(109.0)
