"""The steps every experiment's run.py `main()` calls, in its order, each a plain function.

    args, cfg = parse_args(...)                  # flags -> (namespace, training config); UserError on bad input
    claim_folder(...)                            # a file or a user's folder at --output_dir: refused before any work
    world, device = join_world(cfg, runs)        # torchrun's process group, or one process
    threads, busy_warning = pick_threads(...)    # decided once: a sweep passes them to every run
    setup_fp, setup = setup_of(...)              # what makes runs comparable
    skip_reasons(...)                            # config -> why it does not train here (None: it trains)
    prepare_run_dir(...); with RecordedRun(...)  # one run: resume or --fresh, then train_one and its row
    child_flags(...); record_skip                # a sweep: the flags each run's process gets; skipped rows

A run that fails is a `failed` row, a config the hardware cannot run a `skipped` row; neither stops a sweep.
Bad input is one line and exit code 2 (`BAD_INPUT`), with nothing written.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import sys
import time
import traceback
from typing import Any

import numpy as np
import torch

from dtype_bench import checkpoint, configs, cpu, distributed, launchers, precision, results, signals, sweep
from dtype_bench.cache import CacheError
from dtype_bench.io import FolderRefused, fingerprint, recover_interrupted_writes


class UserError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


BAD_INPUT = (UserError, results.SetupMismatch, FolderRefused, CacheError)  # CacheError: a preset cache not built
"""What a run.py reports as `error: <one line>` with exit code 2."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(spec: str) -> torch.device:
    """'auto' (CUDA if available, else CPU) or an explicit torch device string."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec} requested but CUDA is not available")
    return device


def parse_args(description: str | None, cfg_cls: type, presets: dict[str, dict],
               argv: list[str] | None) -> tuple[argparse.Namespace, Any]:
    """--config/--seed/--seeds, the training fields of `cfg_cls` (configs.training_parser), the sweep and
    launcher flags; `args.config_names` holds the resolved registry names. UserError (one line) on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = configs.training_parser(description, cfg_cls, presets, argv)
    parser.add_argument("--config", required=True,
                        help="precision config: a name, comma-separated names, 'core' or 'all' "
                             "(`dtype-bench configs` lists them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a single run; first seed of --seeds")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...)")
    sweep.add_flags(parser)
    launchers.add_flags(parser)
    try:
        args, cfg = configs.parse(parser, cfg_cls, argv)
        if getattr(cfg, "forecast", None) is not None:  # a forecast's rows live apart from full runs'
            cfg = dataclasses.replace(cfg, output_dir=str(results.forecast_dir(cfg.output_dir)))
        args.config_names = precision.resolve_names(args.config)
    except (ValueError, precision.UnknownConfig) as e:
        raise UserError(str(e)) from e
    if not 0 < args.seeds <= sweep.MAX_SEEDS or not 0 <= args.seed or args.seed + args.seeds > 2**32:
        raise UserError(f"--seeds must be 1..{sweep.MAX_SEEDS} and the seeds within 0..2^32-1 (NumPy's seed range), "
                        f"got --seed {args.seed} --seeds {args.seeds}")
    try:
        launchers.check_flags(args)
    except ValueError as e:
        raise UserError(str(e)) from e
    return args, cfg


def join_world(cfg: Any, runs: list[sweep.RunSpec]) -> tuple[distributed.World, torch.device]:
    """The process group torchrun describes (a single process without it) and this rank's device. UserError
    before joining for a world size that does not divide the gradient accumulation, after it for a sweep under
    torchrun."""
    try:
        distributed.World(world_size=int(os.environ.get("WORLD_SIZE", "1"))).local_accumulation(
            cfg.gradient_accumulation_steps)
    except ValueError as e:
        raise UserError(str(e)) from e
    world, device = distributed.init_from_env(pick_device(cfg.device))
    if world.distributed and len(runs) > 1:
        raise UserError("a sweep does not run under torchrun: launch one torchrun per run, e.g. "
                        "`run.py --config all --seeds 3 --list_runs | xargs -L1 torchrun ... run.py <flags>`")
    return world, device


def pick_threads(requested: int | None, device: torch.device) -> tuple[int | None, str | None]:
    """Set this process's torch threads (`cpu.pick_threads` on CPU; `--threads` or torch's own elsewhere) and
    return them with the busy-machine warning to print, if any."""
    threads, busy_warning = cpu.pick_threads(requested) if device.type == "cpu" else (requested, None)
    if threads:
        torch.set_num_threads(threads)
    return threads, busy_warning


def setup_of(cfg_record: dict, data_fingerprint: str, device: torch.device) -> tuple[str, dict]:
    """Everything that makes runs comparable except config and seed. Left out: where results and live views go,
    which configs a slow CPU skips, and the device index and thread count (each row's environment record keeps
    those)."""
    setup = {k: v for k, v in cfg_record.items()
             if k not in ("output_dir", "device", "threads", "report_to", "max_cpu_slowdown", "emulate_slow_matmuls")}
    setup.update(data_fingerprint=data_fingerprint, device_type=device.type)
    return fingerprint(setup), setup


def skip_reasons(config_names: list[str], device: torch.device, cfg: Any) -> dict[str, str | None]:
    """config -> why it does not train on `device` (`cpu.skip_reason` under the config's --max_cpu_slowdown and
    --emulate_slow_matmuls), None where it trains: decided in the process that starts the runs, as each run
    decides it (a launcher's node may differ)."""
    return {name: cpu.skip_reason(precision.get(name), device, cfg.max_cpu_slowdown, cfg.emulate_slow_matmuls)
            for name in config_names}


def prepare_run_dir(output_dir: str, rid: str, world: distributed.World, *, fresh: bool) -> None:
    """Under the run's lock (sweep.run_gate): finish writes an earlier process left half done, or with `fresh`
    discard the run's checkpoints; no rank goes on before that is done."""
    run_dir = checkpoint.run_dir(output_dir, rid)
    if world.is_main:
        for done in recover_interrupted_writes(run_dir, "*"):
            print(f"{rid}: {done}")
        if fresh and run_dir.exists():
            print(f"{rid}: --fresh, discarding its checkpoints")
            shutil.rmtree(run_dir)
    distributed.barrier()


def first_fields(experiment: str, pc: precision.PrecisionConfig, seed: int, setup_fp: str, cfg: Any,
                 device: torch.device) -> results.ResultRow:
    """The fields every row of a run starts with: what ran, under which configs, where."""
    return results.row_fields(
        experiment=experiment, run_id=results.run_id(experiment, pc.name, seed, setup_fp), config=pc.name,
        seed=seed, setup_fingerprint=setup_fp, precision=pc.to_record(), train_config=cfg.to_record(),
        recipe_departures=cfg.recipe_departures(), env=results.environment(device))


class RecordedRun:
    """Around one run's training; on leaving the block rank 0 appends `row`, whatever happened:

        with RecordedRun(first_fields(...), cfg.output_dir, world, METRICS) as recorded:
            if reason:
                recorded.skip(reason)
            else:
                recorded.row.update(train_one(...))
        return recorded.exit_code

    The block's fields (completed or diverged), `skipped` with the reason, or `failed` with the error (a
    `CheckpointError` as its one line, anything else with its traceback; exit code 1). Interrupted by
    SIGTERM/SIGINT, the run has checkpointed and no row is written (exit code 128 + signal). A row that
    `results.append_result` would refuse (a field `ResultRow` does not define) is written as `failed` saying so.
    The SIGTERM/SIGINT handlers the run installs end with the block. `metrics`: the fields the one-line summary
    prints."""

    def __init__(self, row: results.ResultRow, output_dir: str, world: distributed.World,
                 metrics: tuple[str, ...]):
        self.row, self.output_dir, self.world, self.metrics = row, output_dir, world, metrics
        self.exit_code = 0
        self._handlers = signals.signal_handlers_restored()

    def __enter__(self) -> RecordedRun:
        self._started = time.perf_counter()
        self._handlers.__enter__()
        return self

    def skip(self, reason: str) -> None:
        self.row.update(status="skipped", reason=reason)
        print(f"{self.row['config']}: skipped — {reason}")

    def __exit__(self, kind, error, tb) -> bool:
        self._handlers.__exit__(kind, error, tb)
        rid = self.row["run_id"]
        if isinstance(error, signals.Interrupted):
            print(f"{rid}: {error}; checkpoint saved, run the same command again to resume", file=sys.stderr)
            self.exit_code = error.exit_code
            return True
        if error is not None and not isinstance(error, Exception):
            return False  # KeyboardInterrupt outside the run's deferred signals, SystemExit: not a result
        if isinstance(error, checkpoint.CheckpointError):  # one line with the remedy, no traceback; the row says why
            print(f"error: {error}", file=sys.stderr)
        elif error is not None:  # one run's failure is a result, not a crash of the sweep
            traceback.print_exception(kind, error, tb)
        if error is not None:
            self.row.update(status="failed", error=f"{type(error).__name__}: {error}")
            self.exit_code = 1
        self.row["wall_seconds"] = time.perf_counter() - self._started
        if self.world.is_main:
            self._append()
        return True

    def _append(self) -> None:
        self.row["world_size"] = self.world.world_size
        try:
            results.append_result(self.output_dir, self.row)
        except ValueError as e:  # the fields of a finished run; the row still records that it ran
            print(f"error: {e}", file=sys.stderr)
            kept = ("experiment", "run_id", "config", "seed", "setup_fingerprint", "precision", "train_config",
                    "recipe_departures", "env", "wall_seconds", "world_size")
            self.row = results.row_fields(**{k: self.row[k] for k in kept if k in self.row}, status="failed",
                                          error=f"ValueError: {e}")
            self.exit_code = 1
            results.append_result(self.output_dir, self.row)
        row = self.row
        print(f"{row['run_id']}: {row['status']}" + "".join(
            f"  {k}={row[k]:.4g}" for k in self.metrics if isinstance(row.get(k), (int, float))))


def record_skip(experiment: str, setup_fp: str, cfg: Any, device: torch.device, world: distributed.World,
                metrics: tuple[str, ...], spec: sweep.RunSpec, reason: str) -> None:
    """Append the run's `skipped` row with `reason`, as the run's own process would (a sweep's `record_skip`,
    bound with functools.partial to all but the last two arguments; `cfg` with the threads the sweep pins its
    runs to)."""
    pc = precision.get(spec.config)
    with RecordedRun(first_fields(experiment, pc, spec.seed, setup_fp, cfg, device), cfg.output_dir, world,
                     metrics) as recorded:
        recorded.skip(reason)


def child_flags(argv: list[str] | None, threads: int | None) -> list[str]:
    """The command's flags for each run a sweep starts, less the grid's and the launcher's (each run gets its own
    `--config C --seed S`); `threads`: pinned with `--threads` (decided once: every run of a local sweep is
    timed with the same threads; a launcher's job picks the threads of the node it lands on)."""
    flags = sweep.strip_flags(sys.argv[1:] if argv is None else argv,
                              ("--config", "--seed", "--seeds", "--launcher", *launchers.SLURM_FLAGS))
    return [*flags, "--threads", str(threads)] if threads else flags
