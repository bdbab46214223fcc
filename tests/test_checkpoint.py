"""Checkpoints: exact round trip of every piece of training state, refusal of corrupt or foreign
checkpoints, and kill-and-resume of the real run.py giving the uninterrupted run's log and metrics."""
from __future__ import annotations

import io
import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tiny_run
from interrupt import killed_at_rename
from dtype_bench import checkpoint, optimizers, precision
from dtype_bench.io import FolderRefused, recover_interrupted_writes, sha256_file

CPU = torch.device("cpu")
IDENTITY = {"run_id": "r", "config": "fp32_baseline", "seed": 0, "data_fingerprint": "d"}


class Trainable:
    """A small model with dropout and the optimizer, schedule and scaler a precision config gives it."""

    def __init__(self, config: str):
        torch.manual_seed(0)
        self.pc = precision.get(config)
        # 64 x 96 > 4,096 elements, so bitsandbytes really keeps this matrix's states in 8 bits
        self.model = nn.Sequential(nn.Linear(64, 96), nn.Dropout(0.3), nn.Linear(96, 8)).to(self.pc.weight_dtype)
        self.optimizer = optimizers.build_optimizer(self.pc, [{"params": list(self.model.parameters())}], lr=1e-2,
                                                   betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, device=CPU)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1 / (1 + s))
        self.scaler = precision.grad_scaler(self.pc, CPU)

    def step(self) -> None:
        """Draws from every RNG (python, numpy, torch), as data loading and dropout would."""
        x = torch.randn(16, 64) * (1 + random.random()) * (1 + np.random.rand())
        with precision.autocast(self.pc, CPU):
            loss = self.model(x.to(self.pc.weight_dtype)).float().square().mean()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def checkpoints(self, directory: Path, identity: dict = IDENTITY) -> checkpoint.RunCheckpoints:
        return checkpoint.RunCheckpoints(directory, self.model, identity)

    def save(self, directory: Path) -> None:
        self.checkpoints(directory).save(self.optimizer, self.scheduler, self.scaler, progress={"step": 3},
                                         best_dir=None)

    def restore(self, directory: Path, identity: dict = IDENTITY) -> dict | None:
        return self.checkpoints(directory, identity).restore(self.optimizer, self.scheduler, self.scaler)

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


@pytest.mark.parametrize("config", ["fp32_baseline", "amp_fp16", "amp_bf16_8bit_adam", "bf16_no_compile",
                                    "fp16_fp32_adam_states", "bf16_sr_bf16_moments", "bf16_kahan_bf16_moments"])
def test_restored_state_continues_exactly(tmp_path, config):
    """AdamW, GradScaler, bitsandbytes 8-bit AdamW, torchao stochastic-rounding AdamW, fp32 moments over fp16/bf16
    weights (which torch.optim would round to the weights' dtype on loading) and torch-optimi Kahan states, the LR
    schedule and all RNGs: after restoring, training continues bit for bit as if never stopped."""
    random.seed(1), np.random.seed(1)
    original = Trainable(config)
    for _ in range(3):
        original.step()
    original.save(tmp_path)
    for _ in range(3):
        original.step()

    resumed = Trainable(config)  # fresh objects, different RNG positions
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert resumed.restore(tmp_path) == {"step": 3}
    for _ in range(3):
        resumed.step()
    for a, b in zip(original.params(), resumed.params()):
        assert torch.equal(a, b)
    assert resumed.scheduler.get_last_lr() == original.scheduler.get_last_lr()
    assert resumed.scaler.state_dict() == original.scaler.state_dict()


def test_rng_streams_continue_after_restore(tmp_path):
    model = nn.Linear(2, 2)
    ckpt = checkpoint.RunCheckpoints(tmp_path, model, IDENTITY)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    ckpt.save(opt, sched, scaler, progress={"step": 0}, best_dir=None)
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    ckpt.restore(opt, sched, scaler)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_corrupt_checkpoint_is_refused_and_nothing_applied(tmp_path):
    saved = Trainable("fp32_baseline")
    saved.step()
    saved.save(tmp_path)
    model_file = tmp_path / "last" / checkpoint.MODEL_FILE
    data = bytearray(model_file.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in a weight: the file still parses, the hash does not match
    model_file.write_bytes(bytes(data))

    other = Trainable("fp32_baseline")
    before = other.params()
    with pytest.raises(checkpoint.CheckpointError) as error:
        other.restore(tmp_path)
    assert "corrupt" in _one_line(error) and checkpoint.MODEL_FILE in str(error.value)
    assert all(torch.equal(a, b) for a, b in zip(before, other.params()))
    assert other.optimizer.state_dict()["state"] == {}

    (tmp_path / "last" / checkpoint.STATE_FILE).write_bytes(b"truncated")
    (tmp_path / "last" / checkpoint.MANIFEST).write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError) as error:
        other.restore(tmp_path)
    assert "unreadable" in _one_line(error)


def test_foreign_checkpoint_is_refused(tmp_path):
    saved = Trainable("fp32_baseline")
    saved.save(tmp_path)
    with pytest.raises(checkpoint.CheckpointError) as error:
        Trainable("fp32_baseline").restore(tmp_path, {**IDENTITY, "config": "amp_bf16", "data_fingerprint": "x"})
    message = _one_line(error)
    assert "config" in message and "data_fingerprint" in message and "--fresh" in message
    with pytest.raises(checkpoint.CheckpointError, match="model_signature"):
        Trainable("bf16_no_compile").restore(tmp_path)  # same shapes, other dtypes


def test_pickled_code_in_a_checkpoint_is_never_executed(tmp_path):
    """Even with a manifest that matches (someone rewrote it), state.pt is read with weights_only."""
    saved = Trainable("fp32_baseline")
    saved.save(tmp_path)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state_file = tmp_path / "last" / checkpoint.STATE_FILE
    buffer = io.BytesIO()
    torch.save({"optimizer": Payload()}, buffer)
    state_file.write_bytes(buffer.getvalue())
    manifest_path = tmp_path / "last" / checkpoint.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][checkpoint.STATE_FILE] = {"sha256": sha256_file(state_file), "bytes": state_file.stat().st_size}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        Trainable("fp32_baseline").restore(tmp_path)
    assert not marker.exists()


def test_half_written_checkpoint_is_invisible(tmp_path):
    """A kill while writing leaves only a temporary directory, which is never read as a checkpoint."""
    saved = Trainable("fp32_baseline")
    saved.save(tmp_path)
    os.rename(tmp_path / "last", tmp_path / ".last.tmp-killed")
    fresh = Trainable("fp32_baseline")
    assert fresh.restore(tmp_path) is None


def test_best_dirs_newer_than_last_are_dropped_on_resume(tmp_path):
    """Killed between writing a new best and `last`: the resume keeps the best `last` names."""
    t = Trainable("fp32_baseline")
    ckpts = t.checkpoints(tmp_path)
    kept = ckpts.save_best(2, {"micro_f1": 0.1})
    ckpts.save(t.optimizer, t.scheduler, t.scaler, progress={"step": 2}, best_dir=kept)
    ckpts.save_best(4, {"micro_f1": 0.2})  # ... and killed here
    ckpts.restore(t.optimizer, t.scheduler, t.scaler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-step2", "last"]
    ckpts.load_best(kept)


# ---------------------------------------------------------------- the real run.py, killed and resumed

STEPS = ["--max_steps", "12", "--eval_steps", "4", "--log_every", "1"]


def _final_metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith("val_") or k in (
        "micro_f1", "macro_f1", "precision_at_1", "precision_at_3", "precision_at_5", "rp_at_5", "ndcg_at_5",
        "loss", "best_val_step", "steps", "status", "skipped_steps", "samples_seen", "padding_fraction",
        # diagnostics history (measured steps before and after the resume) and first non-finite origin
        "mean_update_fidelity", "diagnostics_measured_steps", "nonfinite_origin", "static_memory_bytes")}


@pytest.mark.slow
@pytest.mark.parametrize("config, kill", [("fp32_baseline", signal.SIGKILL), ("amp_bf16", signal.SIGKILL),
                                          ("amp_fp16", signal.SIGTERM)])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, small_cache_dir, config, kill):
    """Bit-exact for every config tested (measured: no tolerance was needed on CPU, GradScaler included):
    the whole step log (the resumed run truncates it to the checkpoint and writes the rest again) and the
    final validation/test metrics. SIGKILL resumes from the last evaluation; SIGTERM checkpoints first."""
    flags = ["--config", config, *STEPS]
    reference = tiny_run.run(small_cache_dir, tmp_path / "reference", *flags)
    assert reference.returncode == 0, reference.stderr[-2000:]

    rng_seed = random.randrange(10**6)
    target = random.Random(rng_seed).randint(5, 10)  # after the first checkpoint (step 4)
    where = f"{config}: killed near step {target} (random seed {rng_seed})"
    killed_dir = tmp_path / "killed"
    process = tiny_run.start(small_cache_dir, killed_dir, *flags)
    while tiny_run.logged_steps(killed_dir) < target and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(kill)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == (-kill if kill == signal.SIGKILL else 128 + kill), where + output[-2000:]
    assert tiny_run.rows(killed_dir) == [], where  # an interrupted run has no row yet

    resumed = tiny_run.run(small_cache_dir, killed_dir, *flags)
    assert resumed.returncode == 0, where + resumed.stderr[-2000:]
    (row,) = tiny_run.rows(killed_dir)
    (expected,) = tiny_run.rows(tmp_path / "reference")
    resume_step = row["resumed_from_steps"][0]
    assert f"resuming {row['run_id']} from step {resume_step}" in resumed.stdout
    if kill == signal.SIGKILL:
        assert resume_step % 4 == 0 and resume_step >= 4, where  # the last evaluation's checkpoint
    else:
        assert resume_step >= target, where  # checkpointed where the signal arrived
    logs = [tiny_run.without_timing([json.loads(line) for line in tiny_run.step_log(out, row["run_id"])])
            for out in (killed_dir, tmp_path / "reference")]
    assert logs[0] == logs[1], where
    assert _final_metrics(row) == _final_metrics(expected), where


def test_a_last_folder_that_is_not_a_checkpoint_is_refused_not_replaced(tmp_path):
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "notes.txt").write_text("mine")
    with pytest.raises(checkpoint.CheckpointError) as error:
        Trainable("fp32_baseline").restore(tmp_path)
    assert "no manifest.json of ours" in _one_line(error) and "--fresh" in str(error.value)
    t = Trainable("fp32_baseline")
    with pytest.raises(FolderRefused):
        t.save(tmp_path)
    assert [p.name for p in (tmp_path / "last").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary folder left either


def _train_and_save(directory: Path) -> None:
    t = Trainable("fp32_baseline")
    t.step()
    t.step()
    t.save(directory)


def _save_best(directory: Path) -> None:
    Trainable("fp32_baseline").checkpoints(directory).save_best(4, {})


def test_kill_between_the_two_renames_of_the_swap_keeps_last(tmp_path):
    """The swap renames `last` aside, then the new folder into place; a process killed in between leaves no
    `last`: the next start puts the previous one back, and removes what the killed writes left, saying so."""
    t = Trainable("fp32_baseline")
    t.step()
    t.save(tmp_path)
    expected = t.params()
    killed_at_rename(_train_and_save, (tmp_path,), r"^\.last\.tmp-")  # `last` renamed aside, the new one not in
    killed_at_rename(_save_best, (tmp_path,), r"^\.best-step4\.tmp-")
    assert not (tmp_path / "last").exists() and len(list(tmp_path.glob(".last.old-*"))) == 1
    done = recover_interrupted_writes(tmp_path, "*")
    assert len(done) == 3 and sum(line.startswith("restored") for line in done) == 1
    assert sum("left by an interrupted write" in line for line in done) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == sorted(
        [checkpoint.MODEL_FILE, checkpoint.STATE_FILE, checkpoint.MANIFEST])  # our marker went with the swap
    other = Trainable("fp32_baseline")
    assert other.restore(tmp_path) == {"step": 3}
    assert all(torch.equal(a, b) for a, b in zip(expected, other.params()))

@pytest.mark.slow
def test_a_row_written_after_the_last_checkpoint_reports_the_training_that_happened(tmp_path, small_cache_dir):
    """Killed after the last checkpoint and before its row (the final test evaluation): the process that writes
    the row trains no step, yet the row's throughput and training peak memory are those of the process that
    trained (carried in the checkpoint), and `segments` say who trained what with how many threads."""
    out = tmp_path / "out"
    flags = ["--config", "fp32_baseline", *STEPS]
    first = tiny_run.run(small_cache_dir, out, *flags)
    assert first.returncode == 0, first.stderr[-2000:]
    (trained,) = tiny_run.rows(out)
    (out / "results.jsonl").write_text("")  # the state of a kill between the last checkpoint and the row
    again = tiny_run.run(small_cache_dir, out, *flags)
    assert again.returncode == 0, again.stderr[-2000:]
    (row,) = tiny_run.rows(out)
    assert row["resumed_from_steps"] == [12]
    assert row["segments"] == [{"from_step": 0, "to_step": 12, "threads": 1}, {"from_step": 12, "to_step": 12,
                                                                                "threads": 1}]
    for key in ("timed_steps", "timed_samples", "timing_windows", "samples_per_second"):
        assert row[key] == trained[key], key
    assert row["samples_per_second"] is not None and row["timed_steps"] > 0
    # the peak up to the last checkpoint (the first row's also covers its best-weights reload after it)
    assert row["train_peak_memory_gb"] == pytest.approx(trained["train_peak_memory_gb"], rel=0.02)
    (out / "results.jsonl").write_text("")
    other_threads = tiny_run.run(small_cache_dir, out, *flags, "--threads", "2")  # the last flag wins over SMALL's
    assert other_threads.returncode == 0, other_threads.stderr[-2000:]
    assert "resumed with --threads 2, its checkpoint was trained with 1" in other_threads.stdout
    assert tiny_run.rows(out)[0]["segments"][-1] == {"from_step": 12, "to_step": 12, "threads": 2}
