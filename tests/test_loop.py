"""The training-step bookkeeping (dtype_bench.loop.TrainingRun) on a small real model: the order of its calls is
enforced, logs, evaluations and checkpoints happen at the steps the config names, divergence ends the loop without
a checkpoint, and a SIGTERM checkpoints at the step boundary so that a new run continues from it with the same
step log. The real run.py files are exercised end to end in test_classification_run, test_lm and
test_checkpoint."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from dtype_bench import distributed, optimizers, precision, signals
from dtype_bench.loop import TrainingRun

CPU = torch.device("cpu")


@dataclasses.dataclass
class Cfg:
    output_dir: str
    max_steps: int = 7
    log_every: int = 2
    eval_steps: int = 3
    diverge_patience: int = 2
    diagnostics_every: int = 0
    timing_warmup_steps: int = 0
    gradient_accumulation_steps: int = 2
    report_to: str = "none"
    checkpoints: bool = True

    def to_record(self) -> dict:
        return dataclasses.asdict(self)


class Batches:
    """A data stream with the position/seek interface RunState saves and restores."""

    def __init__(self):
        self.position = 0

    def __next__(self) -> torch.Tensor:
        self.position += 1
        return torch.randn(4, 8)

    def seek(self, position: int) -> None:
        self.position = position


class Harness:
    """A TrainingRun over nn.Linear with the loop body of the experiments' run.py; `losses[step]` replaces
    the loss of that (1-based) step, e.g. with NaN."""

    def __init__(self, cfg: Cfg, losses: dict[int, float] | None = None, metrics: list[float] | None = None):
        torch.manual_seed(0)
        self.cfg, self.losses = cfg, losses or {}
        self.pc = precision.get("fp32_baseline")
        self.model = nn.Linear(8, 3)
        self.optimizer = optimizers.build_optimizer(self.pc, [{"params": list(self.model.parameters())}], lr=1e-2,
                                                   betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, device=CPU)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.scaler = precision.grad_scaler(self.pc, CPU)
        self.batches = Batches()
        self.run = TrainingRun(self.model, self.optimizer, self.scheduler, self.scaler, cfg=cfg, pc=self.pc, seed=0,
                               run_id="r", experiment="test", device=CPU, world=distributed.SINGLE_PROCESS,
                               batches=self.batches, data_fingerprint="d", group_of=lambda name: "body",
                               best_metric="score")
        self.metrics = iter(metrics or [0.1, 0.5, 0.3])
        self.validated_at: list[int] = []

    def validate(self) -> tuple[dict, dict]:
        self.validated_at.append(self.run.step)
        return {"score": next(self.metrics)}, {"checked": True}

    def train(self, until: int | None = None) -> None:
        """The experiments' loop body; stops (without ending the step) inside step `until` if given."""
        while self.run.next_step():
            for _ in range(self.run.local_accumulation):
                self.run.seed_micro_batch(0)
                logits = self.model(next(self.batches))
                loss = logits.square().mean() / self.run.local_accumulation
                if self.run.step + 1 in self.losses:
                    loss = loss * 0 + self.losses[self.run.step + 1]
                self.scaler.scale(loss).backward()
                self.run.micro_batch(loss, logits, samples=4, flops=1.0)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
            with self.run.optimizer_step():
                self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.run.step + 1 == until:
                return
            self.run.end_step(grad_norm, 1e-2, self.validate)

    def log(self) -> list[dict]:
        return [json.loads(line) for line in (Path(self.cfg.output_dir) / "logs" / "r.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def default_signal_handlers():
    with signals.signal_handlers_restored():
        yield


def test_calls_out_of_order_raise(tmp_path):
    h = Harness(Cfg(str(tmp_path)))
    with pytest.raises(RuntimeError, match="outside a step"):
        h.run.micro_batch(torch.zeros(()), torch.zeros(1), samples=1, flops=0)
    with pytest.raises(RuntimeError, match="outside a step"):
        h.run.end_step(torch.zeros(()), 0.0, h.validate)
    assert h.run.next_step()
    with pytest.raises(RuntimeError, match="before end_step"):
        h.run.next_step()
    assert h.run.step == 0  # nothing counted by the refused calls


def test_log_evaluation_checkpoint_and_best_at_the_configured_steps(tmp_path):
    h = Harness(Cfg(str(tmp_path)))
    h.train()
    fields = h.run.finish()
    assert h.validated_at == [3, 6, 7]  # every eval_steps and the last step, once each
    train_lines = [r for r in h.log() if "eval" not in r]
    eval_lines = [r for r in h.log() if "eval" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 8))  # every step logged once, in order
    assert [r["step"] for r in eval_lines] == [3, 6, 7]
    assert all("weight_drift" in r for r in eval_lines)
    # the samples/s window closes only at a log step (2, 3, 4, 6, 7): the other lines carry none
    assert [r["step"] for r in train_lines if "samples_per_second" in r] == [2, 3, 4, 6, 7]
    assert fields["status"] == "completed" and fields["steps"] == 7 and fields["micro_batches"] == 14
    assert h.run.eval_dtypes == {"checked": True}
    assert [e["step"] for e in h.run.state.evals] == [3, 6, 7]
    best = h.run.load_best()
    assert best["step"] == 6 and best["metrics"] == {"score": 0.5}
    # the last checkpoint is the last evaluation's: a new run over the same directory starts after it
    again = Harness(Cfg(str(tmp_path)))
    assert again.run.step == 7 and not again.run.next_step()


def test_divergence_ends_the_loop_without_evaluating_or_checkpointing(tmp_path):
    h = Harness(Cfg(str(tmp_path), max_steps=20), losses={4: float("nan"), 5: float("nan")})
    h.train()
    fields = h.run.finish()
    assert fields["status"] == "diverged" and fields["diverged_at_step"] == 4 and fields["steps"] == 6
    assert h.validated_at == [3]  # the evaluation at step 6 is not run: step 6's flush already saw divergence
    assert [r["loss"] != r["loss"] for r in h.log() if r.get("step") in (4, 5) and "eval" not in r] == [True, True]
    assert Harness(Cfg(str(tmp_path), max_steps=20)).run.step == 3  # the checkpoint is the one of step 3


def test_sigterm_checkpoints_at_the_step_boundary_and_the_next_run_continues(tmp_path):
    h = Harness(Cfg(str(tmp_path)))
    h.train(until=5)  # inside step 5 (not a log or evaluation step)
    os.kill(os.getpid(), signal.SIGTERM)  # noted by the handler TrainingRun installed, not fatal
    with pytest.raises(signals.Interrupted) as stopped:
        h.run.end_step(torch.tensor(1.0), 1e-2, h.validate)
    assert stopped.value.step == 5 and stopped.value.signum == signal.SIGTERM
    assert [r["step"] for r in h.log() if "eval" not in r] == [1, 2, 3, 4, 5]  # pending line 5 written first
    resumed = Harness(Cfg(str(tmp_path)), metrics=[0.2, 0.9])
    assert resumed.run.step == 5 and resumed.batches.position == 10  # two micro-batches per step
    resumed.train()
    fields = resumed.run.finish()
    assert resumed.validated_at == [6, 7]
    assert [r["step"] for r in resumed.log() if "eval" not in r] == list(range(1, 8))
    assert resumed.run.load_best()["step"] == 7 and fields["resumed_from_steps"] == [5]
    assert fields["micro_batches"] == 14


def test_without_checkpoints_nothing_is_written_and_the_final_weights_stay(tmp_path):
    """checkpoints=False (benchmark runs): evaluations and the best validation are recorded, no checkpoint folder
    is written, and load_best keeps the weights as trained."""
    harness = Harness(Cfg(str(tmp_path), checkpoints=False))
    harness.train()
    best = harness.run.state.best
    assert best is not None and best["dir"] is None
    final = [p.detach().clone() for p in harness.model.parameters()]
    assert harness.run.load_best() is best
    assert all(torch.equal(a, b) for a, b in zip(final, harness.model.parameters()))
    assert not (tmp_path / "checkpoints").exists()
