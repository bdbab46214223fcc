"""`run.py ... --plan`: what a command would run and roughly how long each run takes on this machine, before it runs.

Runs the output directory already holds (done, skipped for a reason that still holds, or failed without
--retry_failed: what the command would not run again) are listed as done and cost nothing; when every run is done
nothing is calibrated. Each config that would train is calibrated by training it for `CALIBRATION_STEPS` optimizer
steps through the experiment's own `train` (same model, precision, data, threads and device; one evaluation at the
last step), in a temporary directory that is deleted afterwards. From that run: seconds per optimizer step (the
median timed window after one warm-up step), seconds per evaluation (the evaluation's own wall time) and fixed cost
(the rest: building the model, the warm-up step with any compilation, a final test evaluation). A full run is
estimated as max_steps steps, one evaluation per eval_steps and the fixed cost: rough (the first steps of a run are
not always typical of the rest), but measured here. Configs the hardware cannot run, or `--max_cpu_slowdown` skips,
are listed with the reason and cost nothing.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from typing import Any, Callable

import torch

from dtype_bench import cpu, precision, signals, sweep
from dtype_bench.results import cpu_name

CALIBRATION_STEPS = 4


@dataclasses.dataclass(frozen=True)
class Estimate:
    seconds_per_step: float
    seconds_per_evaluation: float
    fixed_seconds: float
    calibration_seconds: float

    def full_run_seconds(self, max_steps: int, eval_steps: int) -> float:
        return (max_steps * self.seconds_per_step + math.ceil(max_steps / eval_steps) * self.seconds_per_evaluation
                + self.fixed_seconds)


def calibrate(cfg: Any, pc: precision.PrecisionConfig, train: Callable[..., dict]) -> Estimate:
    """Train `pc` for CALIBRATION_STEPS steps with `train(cfg, pc, run_id)` in a temporary output directory."""
    with tempfile.TemporaryDirectory(prefix="dtype-bench-plan-") as output_dir:
        short = dataclasses.replace(cfg, output_dir=output_dir, max_steps=CALIBRATION_STEPS,
                                    eval_steps=CALIBRATION_STEPS, timing_warmup_steps=1, diagnostics_every=0,
                                    report_to="none")
        started = time.perf_counter()
        with signals.signal_handlers_restored():
            row = train(short, pc, f"plan-{pc.name}")
        wall = time.perf_counter() - started
    if row.get("status") != "completed" or not row.get("samples_per_second"):
        raise RuntimeError(f"calibration run {row.get('status')}: {row.get('error', 'no timed steps')}")
    seconds_per_step = row["samples_seen"] / row["steps"] / row["samples_per_second"]
    evaluation = row["eval_wall_seconds"] / row["evaluations"]
    fixed = wall - CALIBRATION_STEPS * seconds_per_step - row["evaluations"] * evaluation
    return Estimate(seconds_per_step, evaluation, max(fixed, 0.0), wall)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def print_plan(config_names: list[str], seeds: int, todo: list[sweep.RunSpec], cfg: Any, device: torch.device,
               train: Callable[..., dict]) -> int:
    """One line per config (done already; trains: estimated time per run; or skipped: why), then the total, for
    the runs in `todo` (`pending`); exit code 0."""
    where = (f"{cpu_name()}, {torch.get_num_threads()} torch thread(s)" if device.type == "cpu"
             else torch.cuda.get_device_name(device))
    done = len(config_names) * seeds - len(todo)
    print(f"plan: {len(config_names)} config(s) x {seeds} seed(s), {cfg.max_steps} steps each, on {device} ({where})"
          + (f"; {done} run(s) already done in {cfg.output_dir}" if done else ""), flush=True)
    if not todo:
        print("nothing to run: every run of this command is already done (nothing calibrated)")
        return 0
    print(f"calibrating each config that trains with {CALIBRATION_STEPS} steps", flush=True)
    total, runs = 0.0, 0
    for name in config_names:
        runs_left = sum(spec.config == name for spec in todo)
        if not runs_left:
            print(f"  {name}: done ({seeds} run(s) already in {cfg.output_dir})", flush=True)
            continue
        pc = precision.get(name)
        reason = cpu.skip_reason(pc, device, cfg.max_cpu_slowdown, cfg.emulate_slow_matmuls)
        if reason:
            print(f"  {name}: skipped: {reason}", flush=True)
            continue
        print(f"  {name}: calibrating ({CALIBRATION_STEPS} steps, then one evaluation)", flush=True)
        try:
            estimate = calibrate(cfg, pc, train)
        except Exception as e:  # the run itself would fail the same way: say so, and go on planning
            print(f"  {name}: calibration failed ({type(e).__name__}: {e}); no estimate", flush=True)
            continue
        seconds = estimate.full_run_seconds(cfg.max_steps, cfg.eval_steps)
        total, runs = total + seconds * runs_left, runs + runs_left
        print(f"  {name}: trains, ~{minutes(seconds)} per run ({estimate.seconds_per_step:.3g} s/step, "
              f"{estimate.seconds_per_evaluation:.3g} s/evaluation, {estimate.fixed_seconds:.3g} s outside the loop "
              f"(set-up, warm-up and compilation, any final test); calibrated in "
              f"{estimate.calibration_seconds:.0f} s)", flush=True)
    print(f"estimated total: ~{minutes(total)} for {runs} run(s) on this machine as loaded now "
          "(other processes on the same cores make every run slower)")
    return 0
