"""`--launcher slurm`: a sweep's runs as Slurm jobs through submitit, one job per (config, seed), in one job array.

Each job runs exactly what the local launcher runs in a child process (`python run.py <flags> --config C --seed
S`), so rows, step logs, checkpoints and locks are the same; the output directory must be on a filesystem that
every node sees (results.jsonl is appended under a file lock, each run holds `locks/<run_id>.lock`, checkpoints
live under `checkpoints/<run_id>/`). On preemption or at the time limit, submitit signals the job (USR2, 90 s
before); the job passes SIGTERM to the run, which checkpoints at its next step boundary and exits, and submitit
requeues the job, which runs the same command again: the run resumes from its checkpoint. Runs already done
(completed, diverged, skipped; failed ones with --retry_failed) are not submitted, so re-running the sweep
command submits what is left.

`--launcher submitit-local` runs the same jobs through submitit's local executor on this machine and waits for
them (CI tests the job path with it); `slurm` submits and returns, printing the job ids.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

LAUNCHERS = ("local", "slurm", "submitit-local")
SLURM_FLAGS = ("--slurm_partition", "--slurm_gpus_per_node", "--slurm_cpus_per_task", "--slurm_time_min",
               "--slurm_mem_gb", "--slurm_array_parallelism", "--slurm_account", "--slurm_qos")
CHECKPOINT_GRACE_S = 80  # submitit signals 90 s before the kill: the run's checkpoint must be written by then


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launcher (where a sweep's runs execute)")
    group.add_argument("--launcher", choices=LAUNCHERS, default="local",
                       help="local: one child process per run, here; slurm: one Slurm job per run (a job array, "
                            "submitit); submitit-local: the same jobs through submitit on this machine")
    group.add_argument("--slurm_partition", help="Slurm partition (default: none, the cluster's default)")
    group.add_argument("--slurm_gpus_per_node", type=int, default=1, help="GPUs per job")
    group.add_argument("--slurm_cpus_per_task", type=int, default=8, help="CPU cores per job")
    group.add_argument("--slurm_time_min", type=int, default=240,
                       help="time limit per job in minutes (a job that reaches it checkpoints and is requeued)")
    group.add_argument("--slurm_mem_gb", type=int, help="memory per job in GB (default: none, the cluster's)")
    group.add_argument("--slurm_array_parallelism", type=int, default=64, help="jobs of the array running at once")
    group.add_argument("--slurm_account", help="Slurm account (default: none)")
    group.add_argument("--slurm_qos", help="Slurm QOS (default: none)")


POSITIVE_FLAGS = ("slurm_gpus_per_node", "slurm_cpus_per_task", "slurm_time_min", "slurm_mem_gb",
                  "slurm_array_parallelism")


def check_flags(args: argparse.Namespace) -> None:
    """Refuse (ValueError, one line) launcher resources that no cluster could grant."""
    for name in POSITIVE_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value <= 0 and not (name == "slurm_gpus_per_node" and value == 0):
            raise ValueError(f"--{name} must be positive, got {value}")


class RunJob:
    """One run as a submitit job: the run's command in a child process. Checkpointable: on submitit's
    preemption/timeout signal the run is told to stop (SIGTERM: it checkpoints), then the job is requeued with
    the same command, which resumes the run."""

    def __init__(self, command: list[str], resume_command: list[str] | None = None):
        """`resume_command`: what a requeued job runs (the command without --fresh, which would start over)."""
        self.command, self.resume_command = command, resume_command or command
        self._child: subprocess.Popen | None = None

    def __call__(self) -> int:
        self._child = subprocess.Popen(self.command)
        return self._child.wait()

    def checkpoint(self, *args, **kwargs):
        import submitit

        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)
            try:
                self._child.wait(timeout=CHECKPOINT_GRACE_S)
            except subprocess.TimeoutExpired:
                print("the run did not checkpoint within the grace period; it resumes from its last evaluation",
                      file=sys.stderr)
        return submitit.helpers.DelayedSubmission(RunJob(self.resume_command))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_child": None}


def executor(kind: str, folder: Path, args: argparse.Namespace, job_name: str):
    try:
        import submitit
    except ImportError as e:
        raise RuntimeError(f"--launcher {kind} needs submitit ({e}); pip install 'dtype-bench[slurm]'") from e
    ex = submitit.AutoExecutor(folder=str(folder), cluster="local" if kind == "submitit-local" else "slurm")
    params = dict(name=job_name, timeout_min=args.slurm_time_min)
    if kind == "slurm":
        params.update(gpus_per_node=args.slurm_gpus_per_node, cpus_per_task=args.slurm_cpus_per_task,
                      slurm_array_parallelism=args.slurm_array_parallelism)
        optional = {"slurm_partition": args.slurm_partition, "mem_gb": args.slurm_mem_gb,
                    "slurm_account": args.slurm_account, "slurm_qos": args.slurm_qos}
        params.update({k: v for k, v in optional.items() if v is not None})
    ex.update_parameters(**params)
    return ex


def launch(kind: str, args: argparse.Namespace, script: str, commands: dict[str, list[str]], output_dir: Path) -> \
        dict[str, int | None]:
    """Submit one job per run (run id -> its command) as one array. `submitit-local` waits and returns each run's
    exit code; `slurm` returns at once (None per run) after printing the job ids."""
    ex = executor(kind, Path(output_dir) / "submitit", args, f"dtype-bench-{Path(script).parent.name}")
    with ex.batch():
        jobs = {rid: ex.submit(RunJob(command, [a for a in command if a != "--fresh"]))
                for rid, command in commands.items()}
    for rid, job in jobs.items():
        print(f"{rid}: submitted as job {job.job_id} (logs: {job.paths.stdout})", flush=True)
    if kind == "slurm":
        print(f"{len(jobs)} job(s) submitted; rows appear in {output_dir}/results.jsonl as they finish. Re-running "
              "this command submits only the runs that still need it.")
        return {rid: None for rid in jobs}
    return {rid: job.result() for rid, job in jobs.items()}
