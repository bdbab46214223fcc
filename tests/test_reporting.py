"""--report_to: the TensorBoard events, read back with TensorBoard's own reader, hold the step log's values."""
from __future__ import annotations

import json
import math
import sys
import types

import pytest

import tiny_run
from dtype_bench import reporting


def test_scalars_flattens_groups_keeps_nan_and_names_the_split():
    record = {"step": 7, "loss": float("nan"), "lr": 1e-3, "loss_scale": None, "nonfinite_origin": "loss",
              "update_fidelity": {"encoder": 0.5, "head": None}, "nonfinite": {"grads": {"head": 2}},
              "optimizer_step_skipped": True}
    got = reporting.scalars(record)
    assert math.isnan(got.pop("train/loss"))
    assert got == {"train/lr": 1e-3, "train/update_fidelity/encoder": 0.5, "train/nonfinite/grads/head": 2.0,
                   "train/optimizer_step_skipped": 1.0}
    assert reporting.scalars({"step": 4, "eval": "validation", "micro_f1": 0.25}) == {"validation/micro_f1": 0.25}


def test_report_to_wandb_without_wandb_is_refused_before_anything_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match=r"pip install 'dtype-bench\[wandb\]'"):
        reporting.require("wandb")


def test_wandb_view_logs_every_record_at_its_step(monkeypatch, tmp_path):
    """The W&B writer's calls (a stand-in module records them; the real package is an optional extra)."""
    calls = []
    run = types.SimpleNamespace(log=lambda values, step: calls.append(("log", step, values)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    view = reporting.WandbView(tmp_path, "dtype-bench-classification", "rid", {"config": "amp_bf16"})
    view.open(None)
    view.write({"step": 3, "loss": 0.5, "eval": None})
    view.close()
    init = calls[0][1]
    assert init["mode"] == "offline" and init["id"] == "rid" and init["config"] == {"config": "amp_bf16"}
    assert calls[1:] == [("log", 3, {"train/loss": 0.5}), ("finish",)]


def test_tensorboard_events_match_the_step_log(tmp_path):
    """A real run with --report_to tensorboard; TensorBoard's EventAccumulator reads the events back."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cache = tiny_run.small_cache(tmp_path / "cache")
    out = tmp_path / "out"
    proc = tiny_run.run(cache, out, "--config", "amp_fp16", "--max_steps", "4", "--eval_steps", "2",
                        "--log_every", "1", "--diagnostics_every", "2", "--timing_warmup_steps", "0",
                        "--report_to", "tensorboard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = tiny_run.rows(out)
    assert row["status"] == "completed" and row["train_config"]["report_to"] == "tensorboard"
    records = [json.loads(line) for line in tiny_run.step_log(out, row["run_id"])]
    events = EventAccumulator(str(out / "tensorboard" / row["run_id"]), size_guidance={"scalars": 0}).Reload()

    def tb(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in events.Scalars(tag)}

    checked = 0
    for rec in records:
        if "eval" in rec:
            expected = {f"validation/{k}": rec[k] for k in ("micro_f1", "macro_f1", "precision_at_1", "loss")}
        else:
            expected = {f"train/{k}": rec[k] for k in ("loss", "lr", "grad_norm", "max_abs_logit", "skipped_steps",
                                                       "loss_scale", "samples_per_second")}
            expected.update({f"train/update_fidelity/{g}": v for g, v in rec.get("update_fidelity", {}).items()})
            expected.update({f"train/lost_update_frac/{g}": v for g, v in rec.get("lost_update_frac", {}).items()})
        for tag, value in expected.items():
            if value is None:
                assert rec["step"] not in tb(tag) if tag in events.Tags()["scalars"] else True
                continue
            assert tb(tag)[rec["step"]] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, rec["step"])
            checked += 1
    train_steps = [r["step"] for r in records if "eval" not in r]
    assert train_steps == [1, 2, 3, 4] and sorted(tb("train/loss")) == train_steps
    assert sorted(tb("validation/micro_f1")) == [2, 4]
    assert any("update_fidelity" in r for r in records) and tb("train/samples_per_second")  # diagnostics, speed
    assert checked >= 4 * 6 + 2 * 4
    assert events.PluginTagToContent("hparams"), "the configs were not logged as hyperparameters"
