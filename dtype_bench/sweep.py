"""Sweeps over configs x seeds: each run in its own process.

A separate process per run is what makes the numbers honest and the sweep robust: peak RSS on CPU is a
per-process high-water mark, TF32 flags / compile caches / allocator state cannot leak between configs,
and a run that crashes, runs out of memory or is killed is recorded as `failed` while the sweep goes on.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dtype_bench.results import append_result, format_table, read_results


@dataclass(frozen=True)
class RunSpec:
    config: str
    seed: int

    def flags(self) -> list[str]:
        return ["--config", self.config, "--seed", str(self.seed)]


def strip_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given flags and their values (both `--flag v` and `--flag=v` forms)."""
    out: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in flags:
            skip_next = True
        elif not any(arg.startswith(f + "=") for f in flags):
            out.append(arg)
    return out


def grid(configs: list[str], first_seed: int, seeds: int) -> list[RunSpec]:
    if seeds <= 0:
        raise ValueError(f"--seeds must be positive, got {seeds}")
    return [RunSpec(c, s) for s in range(first_seed, first_seed + seeds) for c in configs]


def rows_for(output_dir: str | Path, setup_fingerprint: str) -> list[dict]:
    rows, problems = read_results(output_dir)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return [r for r in rows if r.get("setup_fingerprint") == setup_fingerprint]


def run_sweep(script: str, runs: list[RunSpec], passthrough: list[str], output_dir: str | Path,
              setup_fingerprint: str, experiment: str) -> int:
    """Run each spec as `python script <passthrough> --config C --seed S`; return the exit code.

    Runs that already have a row for this setup are not repeated. A child that dies without writing its
    row (killed, segfault, OOM killer) gets a `failed` row written here.
    """
    done = {(r["config"], r["seed"]) for r in rows_for(output_dir, setup_fingerprint)}
    any_failed = False
    for i, spec in enumerate(runs, 1):
        if (spec.config, spec.seed) in done:
            print(f"[{i}/{len(runs)}] {spec.config} seed {spec.seed}: already in results, skipping")
            continue
        print(f"[{i}/{len(runs)}] {spec.config} seed {spec.seed}", flush=True)
        proc = subprocess.run([sys.executable, script, *passthrough, *spec.flags()])
        if not any((r["config"], r["seed"]) == (spec.config, spec.seed)
                   for r in rows_for(output_dir, setup_fingerprint)):
            append_result(output_dir, {
                "experiment": experiment, "config": spec.config, "seed": spec.seed, "status": "failed",
                "setup_fingerprint": setup_fingerprint,
                "error": f"run process exited with code {proc.returncode} without writing a result",
            })
        any_failed |= proc.returncode != 0
    rows = rows_for(output_dir, setup_fingerprint)
    print("\n" + format_table([r for r in rows if (r["config"], r["seed"]) in {(s.config, s.seed) for s in runs}]))
    return 1 if any_failed else 0
