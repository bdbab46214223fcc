"""--launcher submitit-local: the same sweep through submitit's job path writes the rows the local launcher writes."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

import tiny_run
from dtype_bench import launchers

DETERMINISTIC = ("run_id", "config", "seed", "status", "steps", "micro_batches", "samples_seen", "micro_f1",
                 "macro_f1", "precision_at_1", "loss", "val_micro_f1", "best_val_step", "setup_fingerprint")


@pytest.mark.slow
def test_a_submitit_sweep_writes_the_local_launchers_rows(small_cache_dir, tmp_path):
    pytest.importorskip("submitit")
    flags = ["--config", "fp32_baseline,amp_bf16", "--max_steps", "3", "--eval_steps", "3"]
    local = tiny_run.run(small_cache_dir, tmp_path / "local", *flags)
    assert local.returncode == 0, local.stderr[-3000:]
    jobs = tiny_run.run(small_cache_dir, tmp_path / "jobs", *flags, "--launcher", "submitit-local")
    assert jobs.returncode == 0, jobs.stdout[-3000:] + jobs.stderr[-3000:]
    assert jobs.stdout.count("submitted as job") == 2

    def table(out):
        return sorted(tuple(r.get(k) for k in DETERMINISTIC) for r in tiny_run.rows(out))

    assert table(tmp_path / "jobs") == table(tmp_path / "local") and len(table(tmp_path / "local")) == 2
    assert all(r["status"] == "completed" for r in tiny_run.rows(tmp_path / "jobs"))
    assert list((tmp_path / "jobs" / "submitit").glob("*_log.out")), "submitit wrote no job logs"

    again = tiny_run.run(small_cache_dir, tmp_path / "jobs", *flags, "--launcher", "submitit-local")  # nothing to do
    assert again.returncode == 0 and "submitted as job" not in again.stdout and again.stdout.count("not submitted") == 2


def test_a_requeued_job_resumes_instead_of_starting_over():
    """The preemption hook: the job is resubmitted with the run's command less --fresh (which would discard the
    checkpoint), and the job pickles without its child process."""
    pytest.importorskip("submitit")
    job = launchers.RunJob([sys.executable, "run.py", "--fresh", "--config", "amp_bf16"],
                           [sys.executable, "run.py", "--config", "amp_bf16"])
    job._child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    requeued = job.checkpoint()
    assert job._child.poll() is not None  # told to stop (SIGTERM) and waited for
    assert requeued.function.command == [sys.executable, "run.py", "--config", "amp_bf16"]
    assert pickle.loads(pickle.dumps(job))._child is None
