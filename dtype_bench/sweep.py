"""Sweeps over configs x seeds that survive anything: each run in its own process, resumable, lockable.

A separate process per run is what makes the numbers honest and the sweep robust: peak RSS on CPU is a
per-process high-water mark, TF32 flags / compile caches / allocator state cannot leak between configs,
and a run that raises is recorded as `failed` while the sweep goes on; one killed by a signal (SIGKILL, the
OOM killer) is interrupted: it has no row, and the same command resumes it from its checkpoint.
Each run's process is forked from a server process that has imported the experiment's modules once
(multiprocessing's forkserver, which has run no training and no thread pool): a run starts in milliseconds
instead of the seconds that importing torch and transformers takes, as a process of its own all the same.
It inherits the CPU matmul slowdowns the sweep measured (`dtype_bench.cpu`), so it decides as the sweep did.
A run whose config is skipped here (`Grid.skip_reasons`) starts no process: the sweep records its row.

Re-running the same sweep command continues it. For each (config, seed) the newest row in results.jsonl
decides (`needs_run`): completed and diverged runs are done; skipped ones are done while their reason still
applies (a config skipped under `--max_cpu_slowdown 4` runs under `--max_cpu_slowdown none`); failed ones run
again only with `--retry_failed`; runs without a row (never started, or interrupted) run, and resume from
their checkpoint.
`--fresh` starts every selected run over (old rows stay in results.jsonl; the newest row of a run counts).

Splitting a sweep over machines or GPUs needs no scheduler: `--list_runs` prints the grid, one
`--config X --seed Y` per line (for a job array or `xargs -P`), and any number of processes may share one
output dir. A run is trained only by the process holding its lock file (`<output_dir>/locks/<run_id>.lock`,
an OS file lock, released even when the holder is killed); the holder re-reads results.jsonl after taking
it, so a run is never trained twice, and rows are appended under results.jsonl's own lock.
The process exits non-zero at the end if any run of the grid is `failed`.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import runpy
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from filelock import FileLock, Timeout

from dtype_bench import cpu
from dtype_bench.distributed import World, broadcast_from_main
from dtype_bench.io import lock
from dtype_bench.progress import duration
from dtype_bench.results import REPORTED_METRICS, append_result, latest_per_run, mean_std, read_results, run_id

MAX_SEEDS = 1000  # seeds of one sweep: far above any paired comparison's need, far below a grid that fills memory
EXIT_BUSY = 75  # EX_TEMPFAIL: another process holds the run's lock; nothing was done
DONE_STATUSES = ("completed", "diverged", "skipped")


@dataclass(frozen=True)
class RunSpec:
    config: str
    seed: int

    def flags(self) -> list[str]:
        return ["--config", self.config, "--seed", str(self.seed)]


@dataclass(frozen=True)
class Grid:
    """A command's runs (configs x seeds) and what decides which of them run now (`needs_run`): the rows of its
    setup in `output_dir`, `skip_reasons` (config -> why it would be skipped here now, None where it trains),
    `retry_failed` and `fresh`."""
    runs: list[RunSpec]
    output_dir: str
    setup_fingerprint: str
    experiment: str
    skip_reasons: dict[str, str | None]
    retry_failed: bool = False
    fresh: bool = False

    def run_id(self, spec: RunSpec) -> str:
        return run_id(self.experiment, spec.config, spec.seed, self.setup_fingerprint)

    def rows(self, spec: RunSpec) -> list[dict]:
        """The run's rows, oldest first."""
        rid = self.run_id(spec)
        return [r for r in setup_rows(self.output_dir, self.setup_fingerprint) if r.get("run_id") == rid]

    def why_not_now(self, spec: RunSpec, rows: list[dict]) -> str | None:
        """None if the run with these rows trains (or records its skip) now; otherwise why not (`why_not`)."""
        reason = self.skip_reasons[spec.config]
        if needs_run(rows[-1] if rows else None, retry_failed=self.retry_failed, fresh=self.fresh, skip_reason=reason):
            return None
        return why_not(rows[-1], reason)

    def pending(self) -> list[RunSpec]:
        """The runs the command would train or record as skipped, given what `output_dir` holds."""
        newest = latest_per_run(setup_rows(self.output_dir, self.setup_fingerprint))
        return [spec for spec in self.runs if needs_run(
            newest.get(self.run_id(spec)), retry_failed=self.retry_failed, fresh=self.fresh,
            skip_reason=self.skip_reasons[spec.config])]


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sweeps and resuming")
    group.add_argument("--fresh", action="store_true",
                       help="start over: ignore existing checkpoints and rows of the selected runs")
    group.add_argument("--retry_failed", action="store_true",
                       help="run again the runs whose newest row is `failed` (resuming from their checkpoint)")
    group.add_argument("--list_runs", action="store_true",
                       help="print the grid, one `--config X --seed Y` per line, and exit")
    group.add_argument("--plan", action="store_true",
                       help="print what would run and roughly how long each run takes here (each config that trains "
                            "is calibrated with a few steps in a temporary directory), and exit")


def strip_flags(argv: list[str], flags: tuple[str, ...], switches: tuple[str, ...] = ()) -> list[str]:
    """argv without the given flags and their values (both `--flag v` and `--flag=v` forms), and without the
    given value-less `switches`."""
    out: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in flags:
            skip_next = True
        elif arg not in switches and not any(arg.startswith(f + "=") for f in flags):
            out.append(arg)
    return out


def grid(configs: list[str], first_seed: int, seeds: int) -> list[RunSpec]:
    if seeds <= 0:
        raise ValueError(f"--seeds must be positive, got {seeds}")
    return [RunSpec(c, s) for s in range(first_seed, first_seed + seeds) for c in configs]


def list_runs(runs: list[RunSpec]) -> str:
    return "\n".join(" ".join(spec.flags()) for spec in runs)


def needs_run(newest_row: dict | None, *, retry_failed: bool, fresh: bool, skip_reason: str | None) -> bool:
    """Whether a run with this newest row trains now; `skip_reason`: why its config would be skipped here now
    (cpu.skip_reason), None if it would train."""
    if newest_row is None or fresh:
        return True
    if newest_row["status"] == "skipped":
        return skip_reason is None
    return newest_row["status"] == "failed" and retry_failed


def why_not(newest_row: dict, skip_reason: str | None) -> str:
    if newest_row["status"] == "skipped":
        return f"still skipped ({skip_reason})"
    detail = newest_row.get("error") or newest_row.get("reason") or ""
    hint = "; pass --retry_failed to run it again" if newest_row["status"] == "failed" else ""
    return f"already {newest_row['status']}{f' ({detail})' if detail else ''}{hint}"


def setup_rows(output_dir: str | Path, setup_fingerprint: str) -> list[dict]:
    """This setup's rows. Malformed lines are reported on stderr, never skipped silently."""
    rows, problems = read_results(output_dir)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return [r for r in rows if r.get("setup_fingerprint") == setup_fingerprint]


def _lock(output_dir: str | Path, rid: str) -> FileLock:
    path = Path(output_dir) / "locks" / f"{rid}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return lock(path)


@contextlib.contextmanager
def claim_run(output_dir: str | Path, rid: str) -> Iterator[bool]:
    """Hold the run's lock for the block; yields False (and holds nothing) if another process has it."""
    lock = _lock(output_dir, rid)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def is_claimed(output_dir: str | Path, rid: str) -> bool:
    with claim_run(output_dir, rid) as claimed:
        return not claimed


@contextlib.contextmanager
def run_gate(output_dir: str | Path, setup_fingerprint: str, rid: str, *, retry_failed: bool, fresh: bool,
             world: World, skip_reason: str | None) -> Iterator[int | None]:
    """Whether this process trains (or records as skipped) run `rid`: yields None to do it (holding its lock
    for the block), or the exit code to return at once: EXIT_BUSY if another process holds the lock, 0 (1 if
    it failed) if its newest row says it is done (`needs_run`). Rank 0 decides for every rank."""
    with claim_run(output_dir, rid) if world.is_main else contextlib.nullcontext(True) as claimed:
        verdict = -1  # train
        if world.is_main:
            rows = [r for r in setup_rows(output_dir, setup_fingerprint) if r.get("run_id") == rid]
            if not claimed:
                print(f"{rid}: running in another process (its lock is held); nothing to do")
                verdict = EXIT_BUSY
            elif not needs_run(rows[-1] if rows else None, retry_failed=retry_failed, fresh=fresh,
                               skip_reason=skip_reason):
                print(f"{rid}: {why_not(rows[-1], skip_reason)}")
                verdict = int(rows[-1]["status"] == "failed")
        verdict = broadcast_from_main(verdict)
        yield None if verdict == -1 else verdict


def _run_script(script: str, argv: list[str], slowdowns: dict) -> None:
    """A run's process: `python script *argv`, in a process forked from the server (its imports are done), with
    the sweep's measured CPU matmul slowdowns (`cpu.inherit_slowdowns`)."""
    cpu.inherit_slowdowns(slowdowns)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def _run_child(script: str, argv: list[str], preload: Sequence[str]) -> tuple[int, int | None]:
    """Run `python script *argv` to its end in a process forked from the forkserver, which imports `preload`
    when it starts (the sweep's first run); returns its exit code (-N: killed by signal N) and the first
    SIGINT/SIGTERM sent to the sweep meanwhile, which is passed on to the run (so it checkpoints)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    child = context.Process(target=_run_script, args=(script, argv, cpu.measured_slowdowns()),
                            name=Path(script).name)
    child.start()
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        os.kill(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        child.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return child.exitcode, (received[0] if received else None)


RecordSkip = Callable[[RunSpec, str], None]
"""Writes a run's `skipped` row with its reason (runner.record_skip)."""


def run_sweep(script: str, grid: Grid, passthrough: list[str], metrics: tuple[str, ...] = REPORTED_METRICS, *,
              preload: Sequence[str] = (), record_skip: RecordSkip | None = None) -> int:
    """Run each run of the grid that `needs_run` as `python script <passthrough> --config C --seed S`, one after
    the other, each in its own process forked from a server that has imported `preload` (module names); with
    `record_skip`, a run whose config `grid.skip_reasons` skips is recorded by this process (under the run's lock)
    instead. Print the table; return the exit code (1 if any run of the grid failed or was killed, 128 + signal
    if the sweep itself was interrupted)."""
    busy: list[str] = []
    killed: dict[str, int] = {}
    trains = [spec for spec in grid.pending() if not (record_skip and grid.skip_reasons[spec.config])]
    to_go, started, took = len(trains), time.monotonic(), []
    for i, spec in enumerate(grid.runs, 1):
        rid, rows = grid.run_id(spec), grid.rows(spec)
        where = f"[{i}/{len(grid.runs)}] {spec.config} seed {spec.seed}"
        why_not_now = grid.why_not_now(spec, rows)
        if why_not_now:
            print(f"{where}: {why_not_now}, skipping")
            continue
        reason = grid.skip_reasons[spec.config] if record_skip else None
        free = (_record_skipped(grid, spec, reason, record_skip, where) if reason
                else not is_claimed(grid.output_dir, rid))
        if not free:
            print(f"{where}: running in another process, skipping")
            busy.append(rid)
            continue
        if reason:
            continue
        print(where + sweep_time(time.monotonic() - started, took, to_go), flush=True)
        child_started = time.monotonic()
        returncode, interrupted = _run_child(script, [*passthrough, *spec.flags()], preload)
        took.append(time.monotonic() - child_started)
        to_go = max(to_go - 1, 0)
        if interrupted:
            print(f"sweep interrupted during {rid}; run the same command again to resume", file=sys.stderr)
            return 128 + interrupted
        if returncode == EXIT_BUSY:
            busy.append(rid)
        elif returncode < 0:
            killed[rid] = -returncode
            print(f"{rid}: killed by {signal.Signals(-returncode).name}; run the same command again to resume it",
                  file=sys.stderr)
        else:
            record_silent_exit(grid, spec, len(rows), returncode)
    return sweep_table(grid, busy, metrics, killed)


def _record_skipped(grid: Grid, spec: RunSpec, reason: str, record_skip: RecordSkip, where: str) -> bool:
    """Record the run as skipped under its lock, unless its rows, re-read there, say another process did;
    False (nothing done) if another process holds the lock."""
    with claim_run(grid.output_dir, grid.run_id(spec)) as claimed:
        if claimed and grid.why_not_now(spec, grid.rows(spec)) is None:
            print(where, flush=True)
            record_skip(spec, reason)
    return claimed


def sweep_time(elapsed: float, took: list[float], to_go: int) -> str:
    """The sweep's progress for its per-run line: time so far and, once a run has finished, the time left
    estimated as the runs still to train (this one included) times the mean wall time of those trained here
    (skipped runs, recorded by the sweep, take no time)."""
    left = f", ~{duration(to_go * sum(took) / len(took))} left ({to_go} to go)" if took else ""
    return f" (sweep {duration(elapsed)}{left})"


def record_silent_exit(grid: Grid, spec: RunSpec, rows_before: int, returncode: int) -> None:
    """A run process that exited with an error code without appending a row (it crashed before its handler)
    gets a `failed` row saying so. A process killed by a signal gets none: it was interrupted, not failed."""
    if len(grid.rows(spec)) == rows_before:
        append_result(grid.output_dir, {
            "experiment": grid.experiment, "run_id": grid.run_id(spec), "config": spec.config, "seed": spec.seed,
            "status": "failed", "setup_fingerprint": grid.setup_fingerprint,
            "error": f"run process exited with code {returncode} without writing a result",
        })


def _why_not_completed(row: dict) -> str:
    if row["status"] == "diverged":
        origin = row.get("nonfinite_origin")
        return (f"non-finite loss from step {row.get('diverged_at_step')}"
                + (f", first non-finite value in {origin} at step {row.get('nonfinite_origin_step')}" if origin else ""))
    return row.get("reason") or row.get("error") or ""


def seed_summary_table(rows: list[dict], metrics: tuple[str, ...]) -> str:
    """The sweep's end-of-run table. Per config: status counts and mean ± std over seeds of each metric (runs
    that completed; "-" where there is no value, "(n=1)" instead of a std for a single one; "(emulated)" after a
    config whose matmuls were emulated); then why each other run did not complete."""
    by_config: dict[str, list[dict]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(row)
    header = ["config", "runs"] + list(metrics)
    lines = [header]
    for config, runs in by_config.items():
        statuses = {}
        for r in runs:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        done = [r for r in runs if r["status"] == "completed"]
        label = f"{config} (emulated)" if any(r.get("matmuls_emulated") for r in runs) else config
        cells = [label, " ".join(f"{n} {s}" for s, n in statuses.items())]
        for m in metrics:
            mean, std, n = mean_std(r.get(m) for r in done)
            cells.append("-" if mean is None else f"{mean:.4g} (n={n})" if std is None else f"{mean:.4g} ± {std:.2g}")
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{r['config']} seed {r['seed']}: {r['status']} — {_why_not_completed(r)}"
             for r in rows if r["status"] != "completed"]
    if any(r.get("matmuls_emulated") for r in rows):
        notes.append("(emulated): fp16/bf16 matmuls computed in fp32 (--emulate_slow_matmuls): quality is the dtype's, "
                     "samples/s and memory the emulation's")
    return "\n".join(out + ([""] + notes if notes else []))


def sweep_table(grid: Grid, busy: list[str], metrics: tuple[str, ...], killed: dict[str, int] | None = None) -> int:
    """Print the grid's newest rows as a table; the sweep's exit code (1 if any run of the grid failed or was
    killed: `killed`, run id -> signal)."""
    newest = latest_per_run(setup_rows(grid.output_dir, grid.setup_fingerprint))
    grid_rows = [newest[r] for r in map(grid.run_id, grid.runs) if r in newest]
    print("\n" + seed_summary_table(grid_rows, metrics))
    if busy:
        print(f"\n{len(busy)} run(s) were running in another process: {', '.join(busy)}")
    if killed:
        print(f"\n{len(killed)} run(s) were killed by a signal: {', '.join(killed)} (interrupted, not failed: the "
              "same command resumes them from their checkpoints)", file=sys.stderr)
    failed = [r["run_id"] for r in grid_rows if r["status"] == "failed"]
    if failed:
        print(f"\n{len(failed)} run(s) failed: {', '.join(failed)} (--retry_failed runs them again)", file=sys.stderr)
    return 1 if failed or killed else 0


def launch_sweep(launcher_args: argparse.Namespace, script: str, grid: Grid, passthrough: list[str],
                 metrics: tuple[str, ...] = REPORTED_METRICS) -> int:
    """The runs of the grid that `needs_run` as jobs of another launcher (dtype_bench.launchers), each running
    `python script <passthrough> --config C --seed S` as the local launcher's children do."""
    from dtype_bench import launchers

    pending: dict[str, tuple[RunSpec, int]] = {}
    for spec in grid.runs:
        rows = grid.rows(spec)
        why_not_now = grid.why_not_now(spec, rows)
        if why_not_now:
            print(f"{spec.config} seed {spec.seed}: {why_not_now}, not submitted")
        else:
            pending[grid.run_id(spec)] = (spec, len(rows))
    commands = {rid: [sys.executable, script, *passthrough, *spec.flags()] for rid, (spec, _) in pending.items()}
    codes = (launchers.launch(launcher_args.launcher, launcher_args, script, commands, Path(grid.output_dir))
             if commands else {})
    if launcher_args.launcher == "slurm":
        return 0
    busy = [rid for rid, code in codes.items() if code == EXIT_BUSY]
    killed = {rid: -code for rid, code in codes.items() if code < 0}
    for rid, code in codes.items():
        if code != EXIT_BUSY and code >= 0:
            record_silent_exit(grid, *pending[rid], code)
    return sweep_table(grid, busy, metrics, killed)
