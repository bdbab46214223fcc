"""What every experiment's run.py does around its training loop, written once.

Parse the flags (precision config, seeds, preset, one flag per training field), pick the device, load the
prepared data, claim the output directory for this setup, then either train one (config, seed) in this
process or sweep: one subprocess per run (see sweep.py). A run that fails is a `failed` row, a config the
hardware cannot run a `skipped` row; neither stops a sweep.

A run.py hands in its training-config dataclass and presets, `load_data(cfg)` (returning an object with a
`.fingerprint` of the prepared data) and `train(cfg, pc, seed, data, device, run_id) -> dict` (the result
fields). The training loop itself stays in run.py, where it can be read; its per-step bookkeeping is
`loop.TrainingRun`'s. The config dataclass must have the fields `output_dir`, `device` and `threads`, and a
`to_record()` method.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dtype_bench import checkpoint, cpu, distributed, launchers, plan, precision, results, signals, sweep
from dtype_bench.configs import HelpFormatter, add_flags, resolve
from dtype_bench.cache import CacheError
from dtype_bench.io import FolderRefused, claim_folder, fingerprint, recover_interrupted_writes

TrainFn = Callable[[Any, precision.PrecisionConfig, int, Any, torch.device, str], dict]


class UserError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


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
    """--config/--seed/--seeds/--preset plus one flag per field of `cfg_cls`; `args.config_names` holds the
    resolved registry names."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True,
                        help="precision config: a name, comma-separated names, 'core' or 'all' "
                             "(`dtype-bench configs` lists them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a single run; first seed of --seeds")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...)")
    parser.add_argument("--preset", choices=sorted(presets), default="full",
                        help="which defaults the training fields start from (each field's help shows them)")
    add_flags(parser, cfg_cls, skip=("preset",), presets=presets)
    sweep.add_flags(parser)
    launchers.add_flags(parser)
    args = parser.parse_args(argv)
    try:
        cfg = resolve(cfg_cls, presets, args.preset, args)
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


def setup_of(cfg_record: dict, data_fingerprint: str, device: torch.device) -> tuple[str, dict]:
    """Everything that makes runs comparable except config and seed. Left out: where results and live views go,
    which configs a slow CPU skips, and the device index and thread count (each row's environment record keeps
    those)."""
    setup = {k: v for k, v in cfg_record.items()
             if k not in ("output_dir", "device", "threads", "report_to", "max_cpu_slowdown")}
    setup.update(data_fingerprint=data_fingerprint, device_type=device.type)
    return fingerprint(setup), setup


def run_single(experiment: str, config_name: str, seed: int, cfg: Any, device: torch.device, setup_fp: str,
               train: Callable[[precision.PrecisionConfig, str], dict], metrics: tuple[str, ...], *,
               world: distributed.World = distributed.SINGLE_PROCESS, fresh: bool = False,
               retry_failed: bool = False) -> int:
    """Train one (config, seed) here unless it is done or another process is training it (sweep.run_gate);
    it resumes from its checkpoint if it has one, unless `fresh`."""
    pc = precision.get(config_name)
    rid = results.run_id(experiment, pc.name, seed, setup_fp)
    reason = cpu.skip_reason(pc, device, cfg.max_cpu_slowdown)
    with sweep.run_gate(cfg.output_dir, setup_fp, rid, retry_failed=retry_failed, fresh=fresh, world=world,
                        skip_reason=reason) as exit_code:
        if exit_code is not None:
            return exit_code
        if world.is_main:  # the run's lock is held: nobody else writes its checkpoints
            for done in recover_interrupted_writes(checkpoint.run_dir(cfg.output_dir, rid), "*"):
                print(f"{rid}: {done}")
        if fresh and world.is_main and checkpoint.run_dir(cfg.output_dir, rid).exists():
            print(f"{rid}: --fresh, discarding its checkpoints")
            shutil.rmtree(checkpoint.run_dir(cfg.output_dir, rid))
        distributed.barrier()  # no rank looks for a checkpoint before it is gone
        with signals.signal_handlers_restored():
            return _train_and_record(experiment, pc, seed, cfg, device, setup_fp, train, metrics, world, reason)


def _train_and_record(experiment: str, pc: precision.PrecisionConfig, seed: int, cfg: Any, device: torch.device,
                      setup_fp: str, train: Callable[[precision.PrecisionConfig, str], dict],
                      metrics: tuple[str, ...], world: distributed.World, reason: str | None) -> int:
    """Train and append the row (rank 0), whatever happens: completed/diverged from `train`, `skipped` with
    `reason` (cpu.skip_reason) if there is one, `failed` with the error. Interrupted by SIGTERM/SIGINT, the run has
    checkpointed and writes no row."""
    rid = results.run_id(experiment, pc.name, seed, setup_fp)
    row = {"experiment": experiment, "run_id": rid, "config": pc.name, "seed": seed,
           "setup_fingerprint": setup_fp, "precision": pc.to_record(), "train_config": cfg.to_record(),
           "recipe_departures": cfg.recipe_departures(), "env": results.environment(device)}
    started = time.perf_counter()
    exit_code = 0
    if reason:
        row.update(status="skipped", reason=reason)
        print(f"{pc.name}: skipped — {reason}")
    else:
        try:
            row.update(train(pc, rid))
        except signals.Interrupted as e:
            print(f"{rid}: {e}; checkpoint saved, run the same command again to resume", file=sys.stderr)
            return e.exit_code
        except checkpoint.CheckpointError as e:  # one line with the remedy, no traceback; the row says why
            print(f"error: {e}", file=sys.stderr)
            row.update(status="failed", error=f"{type(e).__name__}: {e}")
            exit_code = 1
        except Exception as e:  # one run's failure is a result, not a crash of the sweep
            traceback.print_exc()
            row.update(status="failed", error=f"{type(e).__name__}: {e}")
            exit_code = 1
    row["wall_seconds"] = time.perf_counter() - started
    if not world.is_main:
        return exit_code
    row["world_size"] = world.world_size
    results.append_result(cfg.output_dir, row)
    print(f"{rid}: {row['status']}" + "".join(
        f"  {k}={row[k]:.4g}" for k in metrics if isinstance(row.get(k), (int, float))))
    return exit_code


def main(script: str, experiment: str, cfg_cls: type, presets: dict[str, dict], *,
         load_data: Callable[[Any], Any], train: TrainFn, metrics: tuple[str, ...],
         description: str | None = None, argv: list[str] | None = None) -> int:
    """The whole command line of an experiment's run.py; returns the process exit code."""
    try:
        args, cfg = parse_args(description, cfg_cls, presets, argv)
        runs = sweep.grid(args.config_names, args.seed, args.seeds)
        if args.list_runs:
            print(sweep.list_runs(runs))
            return 0
        if not args.plan:  # a plan writes nothing there
            claim_folder(cfg.output_dir, results.SETUP_FILE, "fingerprint")  # a file, a user's folder: before any work
        try:  # before joining the process group: a torchrun world size that does not divide the accumulation
            distributed.World(world_size=int(os.environ.get("WORLD_SIZE", "1"))).local_accumulation(
                cfg.gradient_accumulation_steps)
        except ValueError as e:
            raise UserError(str(e)) from e
        world, device = distributed.init_from_env(pick_device(cfg.device))
        if world.distributed and len(runs) > 1:
            raise UserError("a sweep does not run under torchrun: launch one torchrun per run, e.g. "
                            "`run.py --config all --seeds 3 --list_runs | xargs -L1 torchrun ... run.py <flags>`")
        threads, busy_warning = cpu.pick_threads(cfg.threads) if device.type == "cpu" else (cfg.threads, None)
        if threads:
            torch.set_num_threads(threads)
        with distributed.main_process_first(world):  # rank 0 prepares a missing cache alone
            data = load_data(cfg)
        if busy_warning and world.is_main:  # after the data: a command without prepared data ends on its one error line
            print(busy_warning)
        setup_fp, setup = setup_of(cfg.to_record(), data.fingerprint, device)

        def skip_reason(config: str) -> str | None:  # decided here as each run would (a launcher's node may differ)
            return cpu.skip_reason(precision.get(config), device, cfg.max_cpu_slowdown)

        if args.plan:
            todo = plan.pending(runs, cfg.output_dir, setup_fp, experiment, skip_reason=skip_reason,
                                retry_failed=args.retry_failed, fresh=args.fresh)
            return plan.print_plan(args.config_names, args.seeds, todo, cfg, device,
                                   lambda short, pc, rid: train(short, pc, args.seed, data, device, rid))
        results.claim_output_dir(cfg.output_dir, setup_fp, setup)
    except (UserError, results.SetupMismatch, FolderRefused, CacheError) as e:  # CacheError: a preset cache not built
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(runs) == 1 and args.launcher == "local":
        try:
            return run_single(experiment, args.config_names[0], args.seed, cfg, device, setup_fp,
                              lambda pc, rid: train(cfg, pc, args.seed, data, device, rid), metrics,
                              world=world, fresh=args.fresh, retry_failed=args.retry_failed)
        finally:
            distributed.shutdown()
    passthrough = sweep.strip_flags(sys.argv[1:] if argv is None else argv,
                                    ("--config", "--seed", "--seeds", "--launcher", *launchers.SLURM_FLAGS))
    if args.launcher != "local":  # each job picks the threads of the node it lands on
        return sweep.launch_sweep(args, str(Path(script).resolve()), runs, passthrough, cfg.output_dir, setup_fp,
                                  experiment, skip_reason=skip_reason, retry_failed=args.retry_failed,
                                  fresh=args.fresh, metrics=metrics)
    if threads and not cfg.threads:  # decided once: every run of the sweep is timed with the same threads
        passthrough += ["--threads", str(threads)]
    return sweep.run_sweep(str(Path(script).resolve()), runs, passthrough, cfg.output_dir, setup_fp, experiment,
                           skip_reason=skip_reason, retry_failed=args.retry_failed, fresh=args.fresh, metrics=metrics)
