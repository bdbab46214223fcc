"""The bookkeeping around an experiment's training step, owned in one place so that its order is code.

An experiment's run.py keeps what a reader comes for (batch -> autocast forward -> loss -> scaled backward ->
unscale/clip -> optimizer step) and hands everything else to a `TrainingRun`:

    run = TrainingRun(model, optimizer, scheduler, scaler, ...)    # builds and restores the helpers, in order
    while run.next_step():                                         # opens the step's timer window
        for micro in range(run.local_accumulation):
            run.seed_micro_batch(micro)                            # dropout masks: (seed, micro-batch) only
            with run.forward_backward():                           # eager on a diagnostics step
                ... forward, loss, scaler.scale(loss).backward() ...
            run.micro_batch(loss, logits, samples=..., flops=...)
        ... scaler.unscale_(optimizer); grad_norm = clip_grad_norm_(...) ...
        with run.optimizer_step():                                 # diagnostics around it, SR noise seeded
            scaler.step(optimizer)
        ... scaler.update(); scheduler.step(); optimizer.zero_grad() ...
        run.end_step(grad_norm, lr, validate)                      # count, time, log, evaluate, checkpoint
    fields = run.finish()                                          # throughput, diagnostics, compile counters

The ordering rules it enforces:
- peak calibration after the TF32 flags (set before the model is built) and before the memory reset, so that
  neither the calibration's buffers nor the build count as training memory;
- diagnostics built before the checkpoint restore (they keep the initial weights and take restored history);
- the step log flushed before the run state is saved (its offset and the monitor's counters must be final);
- the evaluation condition decided once per step, evaluation before the checkpoint that records its result;
- SIGTERM/SIGINT acted on at a step boundary every rank reaches, after the pending log lines are written;
- a compiled model's graphs independent of the diagnostics: a measured step's forward and backward run eagerly
  (`forward_backward`), so its hooks neither recompile nor break the graphs of the other steps;
- the methods called in the order above: a call out of order raises instead of corrupting the counters.
Under DDP every rank runs all of it; rank 0 alone writes logs, evaluates and saves.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dtype_bench import (checkpoint, compilation, cpu, distributed, flops, precision, reporting, results, signals,
                         throughput)
from dtype_bench.diagnostics import PrecisionDiagnostics
from dtype_bench.memory import PeakMemory
from dtype_bench.monitor import TrainingMonitor
from dtype_bench.progress import Progress
from dtype_bench.run_state import RunState

Validate = Callable[[], "tuple[dict, dict | None]"]  # () -> (validation metrics, dtypes checked on it)


def stop_step(cfg: Any) -> int:
    """The step a run stops after: max_steps, or ceil(forecast x max_steps) for a forecast run (which follows the
    full run's schedule, so its steps are the full run's first ones)."""
    fraction = getattr(cfg, "forecast", None)
    return cfg.max_steps if fraction is None else max(1, math.ceil(fraction * cfg.max_steps))


@contextlib.contextmanager
def _without_native_stderr() -> Iterator[None]:
    """File descriptor 2 points at /dev/null for the block, so whatever is written to stderr inside it is dropped:
    only for one library call whose C++ side prints known noise there."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class TrainingRun:
    """One run's step bookkeeping: step timer, monitor and step log, diagnostics sampling, evaluation and
    checkpoint cadence, stop signals, progress (a bar on a terminal, lines in a log), what torch.compile did
    (`compilation.CompileWatch`), and the counters of `RunState`.

    `cfg` is the experiment's training config (fields max_steps, log_every, eval_steps, diverge_patience,
    diagnostics_every, timing_warmup_steps, gradient_accumulation_steps, output_dir, and `to_record()`).
    `best_metric`: keep the weights of the best validation by this metric (higher is better) and reload them
    with `load_best()`; None keeps no weights (every evaluation is still in `evals`). `matmuls_emulated`: the
    run's steps run under `cpu.EmulatedMatmuls`, and so does its MFU peak calibration (not torch's slow kernel)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: torch.amp.GradScaler, *, cfg: Any, pc: precision.PrecisionConfig, seed: int, run_id: str,
                 experiment: str, device: torch.device, world: distributed.World, batches: Any,
                 data_fingerprint: str, group_of: Callable[[str], str], best_metric: str | None = None,
                 matmuls_emulated: bool = False):
        self.cfg, self.seed, self.world, self.best_metric = cfg, seed, world, best_metric
        self.stop_step = stop_step(cfg)
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.local_accumulation = world.local_accumulation(cfg.gradient_accumulation_steps)
        with cpu.matmul_emulation(matmuls_emulated):  # MFU denominators, measured as the steps compute
            self.peaks = flops.calibrate_peaks(device, pc.compute_dtype, tf32=pc.tf32, fp8=pc.fp8)
        self.memory = PeakMemory(device)  # reset point: model and optimizer built; train and eval peaks apart
        self.compile = compilation.CompileWatch()  # before the first forward: counts every graph of the run
        self.timer = throughput.StepTimer(device, warmup_steps=cfg.timing_warmup_steps, last_step=self.stop_step)
        self.diagnostics = PrecisionDiagnostics(model, optimizer, group_of, every=cfg.diagnostics_every)
        self.checkpoints = checkpoint.RunCheckpoints(
            checkpoint.run_dir(cfg.output_dir, run_id), model,
            identity={"run_id": run_id, "config": pc.name, "seed": seed, "data_fingerprint": data_fingerprint},
            record={"train_config": cfg.to_record(), "precision": pc.to_record()})
        resumed = self.checkpoints.restore(optimizer, scheduler, scaler)  # None: no checkpoint, start at step 0
        self.log = results.StepLog(
            Path(cfg.output_dir) / "logs" / f"{run_id}.jsonl", resume_at=resumed["log_offset"] if resumed else None,
            views=reporting.views(cfg, pc, seed, run_id, experiment)) if world.is_main else None
        self.monitor = TrainingMonitor(self.log, device, scaler, cfg.diverge_patience, self.diagnostics)
        self.state = RunState(batches=batches, monitor=self.monitor, diagnostics=self.diagnostics, log=self.log,
                              timer=self.timer, memory=self.memory, resumed=resumed)
        if resumed and world.is_main:
            print(f"resuming {run_id} from step {self.state.step}", flush=True)
        self.eval_dtypes: dict | None = None
        self.sdpa_ops: list[str] | None = None  # the attention ops that ran, seen on the last warm-up step
        self._profile: torch.profiler.profile | None = None
        self.eval_seconds, self.evaluations = 0.0, 0  # validation during training, this process
        self._in_step = False
        self._step_samples, self._step_flops = 0, 0.0
        signals.defer_stop_signals()  # SIGTERM/SIGINT: checkpoint at the next step boundary, then stop
        self.name = f"{pc.name} seed {seed}"
        if resumed:
            self._keep_threads(self.state.earlier_segments[-1]["threads"])
        self._progress = Progress(self.name, self.stop_step, initial=self.state.step, enabled=world.is_main,
                                  activity=self.compile.activity)

    @property
    def step(self) -> int:
        """Optimizer steps done (during a step: its 0-based index)."""
        return self.state.step

    @property
    def status(self) -> str:
        return "diverged" if self.monitor.diverged else "completed"

    def next_step(self) -> bool:
        """False once `stop_step` steps are done or the run diverged; otherwise opens the next step's timer window
        (untimed on a diagnostics step, which does extra, untrained work)."""
        if self._in_step:
            raise RuntimeError("next_step() called before end_step() closed the previous step")
        if self.state.step >= self.stop_step or self.monitor.diverged:
            return False
        self._in_step = True
        self._step_samples, self._step_flops = 0, 0.0  # this rank's: throughput and MFU are per device
        self.timer.start(timed=not self.diagnostics.measures(self.state.step + 1))
        if self.state.step + 1 == self.cfg.timing_warmup_steps and self.world.is_main:  # untimed: may be slower
            self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            with _without_native_stderr():  # kineto prints "USDT ... profiler_start" there: noise in every run
                self._profile.__enter__()
        return True

    def seed_micro_batch(self, micro: int) -> None:
        """Dropout masks depend on (seed, global micro-batch index) only: equal for any world size and after
        a resume."""
        index = self.world.micro_batch_index(self.state.step, micro, self.cfg.gradient_accumulation_steps)
        distributed.reseed(self.seed, 0, index)

    @contextlib.contextmanager
    def forward_backward(self) -> Iterator[None]:
        """Around a micro-batch's forward and backward. On a diagnostics step a compiled model runs eagerly
        (`torch.compiler.set_stance("force_eager")`): the activation-gradient hooks need eager tensors, and the
        compiled graphs must not depend on whether a step is measured. Measured steps are left out of the
        throughput timing, so the timed steps are all compiled; the optimizer step stays as configured."""
        self._require_step("forward_backward")
        if not self.diagnostics.measures(self.state.step + 1):
            yield
            return
        with torch.compiler.set_stance("force_eager"):
            yield

    def micro_batch(self, loss: torch.Tensor, logits: torch.Tensor, *, samples: int, flops: float) -> None:
        """After a micro-batch's backward: its (accumulation-divided) loss and logits, and the samples and
        FLOPs this rank computed for it."""
        self._require_step("micro_batch")
        self.monitor.micro_batch(loss, logits)
        self.state.micro_batches += self.world.world_size
        self._step_samples += samples
        self._step_flops += flops

    @contextlib.contextmanager
    def optimizer_step(self) -> Iterator[None]:
        """Around `scaler.step(optimizer)`: gradients are final (unscaled, clipped). On diagnostics steps an fp32
        shadow AdamW of the update is measured; stochastic rounding draws the same noise on every rank and
        after a resume."""
        self._require_step("optimizer_step")
        self.diagnostics.before_step()
        distributed.reseed(self.seed, 1, self.state.step)
        yield
        self.diagnostics.after_step()

    def end_step(self, grad_norm: torch.Tensor, lr: float, validate: Validate) -> None:
        """After the optimizer step and `zero_grad`: count the step, close its timer window, queue its signals;
        on a log step write them (the loop's only host sync) and decide divergence; on an evaluation step
        (rank 0) run `validate` and log it; checkpoint after an evaluation, and on SIGTERM/SIGINT checkpoint
        and raise `signals.Interrupted`."""
        self._require_step("end_step")
        self._in_step = False
        self.state.step += 1
        step, cfg = self.state.step, self.cfg
        self.timer.stop(self._step_samples, self._step_flops)
        if self._profile is not None:
            with _without_native_stderr():
                self._profile.__exit__(None, None, None)
            self.sdpa_ops = sorted({e.key for e in self._profile.key_averages() if "scaled_dot_product" in e.key})
            self._profile = None
        self.compile.step_done(step)
        self.monitor.step(step, grad_norm, lr)
        self._progress.update()
        evaluating = step % cfg.eval_steps == 0 or step == self.stop_step
        if step % cfg.log_every == 0 or evaluating:
            self.timer.pause()  # the flush is a host sync, not training time
            rate = self.timer.recent_samples_per_second()
            record = self.monitor.flush({"samples_per_second": rate})
            self._progress.show(loss=record["loss"], **({"samples/s": rate} if rate else {}))
            if self.monitor.diverged:
                return  # no evaluation, no checkpoint: next_step() ends the loop
        if evaluating and self.world.is_main:
            self._evaluate(step, validate)
        stop = signals.stop_signal(self.world, sync_point=step % cfg.log_every == 0)
        if stop:
            self.monitor.flush()  # a single process may stop between log steps: write its pending lines first
        if (evaluating or stop) and self.world.is_main and cfg.checkpoints:
            self.checkpoints.save(self.optimizer, self.scheduler, self.scaler, progress=self.state.state_dict(),
                                  best_dir=self.state.best_dir)
        if stop:
            raise signals.Interrupted(stop, step)

    def _evaluate(self, step: int, validate: Validate) -> None:
        started = time.perf_counter()
        with self.memory.evaluating():
            metrics, self.eval_dtypes = validate()
        seconds = time.perf_counter() - started
        self.eval_seconds, self.evaluations = self.eval_seconds + seconds, self.evaluations + 1
        shown = "".join(f" {k} {metrics[k]:.4g}," for k in ("loss", self.best_metric)
                        if isinstance(metrics.get(k), float))
        self._progress.write(f"{self.name}: step {step} validation{shown} {seconds:.1f} s")
        self.log.write({"step": step, "eval": "validation", **metrics,
                        "weight_drift": self.diagnostics.weight_drift()})
        self.state.evals.append({"step": step, **metrics})
        if self.best_metric and (self.state.best is None
                                 or metrics[self.best_metric] > self.state.best["metrics"][self.best_metric]):
            self.state.best = {"step": step, "metrics": metrics,  # weights on disk, unless checkpoints are off
                               "dir": self.checkpoints.save_best(step, metrics) if self.cfg.checkpoints else None}

    def _require_step(self, what: str) -> None:
        if not self._in_step:
            raise RuntimeError(f"{what}() outside a step: call next_step() first")

    def evaluating(self) -> contextlib.AbstractContextManager:
        """Around an evaluation after training (e.g. on the test split): its peak memory is kept apart."""
        return self.memory.evaluating()

    def load_best(self) -> dict:
        """Reload the best validation's weights (without checkpoints: keep the final ones); returns that
        evaluation ({"step", "metrics", "dir"})."""
        if self.cfg.checkpoints:
            self.checkpoints.load_best(self.state.best_dir)
        return self.state.best

    def finish(self) -> results.ResultRow:
        """Close the progress display and the step log; the result fields every experiment reports (rank 0 gets
        the full set, other ranks status and steps), `compile` among them (`compilation.CompileWatch.record`;
        a line says so when torch.compile recompiled or fell back to eager). Memory fields come from
        `memory_fields()`, after any evaluation that follows."""
        self._progress.close()
        out = results.row_fields(status=self.status, steps=self.state.step)
        if not self.world.is_main:
            return out
        self.log.close()
        self.compile.step_done(self.state.step)  # a compilation in the last evaluation shows as that step's
        compiled = self.compile.record()
        trouble = compilation.summary_line(compiled)
        if trouble:
            print(f"{self.name}: {trouble}", flush=True)
        out.update(results.row_fields(
            resumed_from_steps=self.state.resumed_from_steps, segments=self.state.segments,
            skipped_steps=self.monitor.skipped_steps, micro_batches=self.state.micro_batches,
            train_wall_seconds=self.state.train_seconds, sdpa_ops=self.sdpa_ops, eval_wall_seconds=self.eval_seconds,
            evaluations=self.evaluations, compile=compiled,
            **throughput.throughput_record(self.timer.summary(), self.peaks, self.world.world_size),
            **self.diagnostics.summary()))
        if self.monitor.diverged:
            out.update(results.row_fields(diverged_at_step=self.monitor.diverged_at,
                                          first_nonfinite_step=self.monitor.first_nonfinite_step))
        return out

    def _keep_threads(self, before: int) -> None:
        """A resume continues bit-exactly only with the thread count it was checkpointed with (reductions split
        differently): keep it unless --threads asked for another, and say so either way."""
        now = torch.get_num_threads()
        if now == before:
            return
        if self.cfg.threads is None:
            torch.set_num_threads(before)
            print(f"{self.name}: resuming with {before} torch threads, as its checkpoint was trained (not {now})")
        else:
            print(f"warning: {self.name}: resumed with --threads {now}, its checkpoint was trained with {before}: "
                  "from here the run is not bit-identical to an uninterrupted one (`segments` in the row)")

    def memory_fields(self) -> results.ResultRow:
        return self.memory.summary(trained=self.state.trained)
