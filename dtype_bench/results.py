"""Results rows, step logs and the environment record, shared by every experiment.

Layout of an output directory:
    results.jsonl          one row per finished run (completed | diverged | skipped | failed), appended atomically
    logs/<run_id>.jsonl    that run's step log; NaN/Inf are written as NaN/Infinity, never replaced
    setup.json             the setup fingerprint the directory belongs to (other setups are refused)
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import IO, Iterable

import numpy as np
import torch

from dtype_bench.io import (
    append_jsonl, atomic_directory, atomic_write_json, claim_folder, fsync_dir, json_dumps, lock, open_no_link,
    read_jsonl,
)

STATUSES = ("completed", "diverged", "skipped", "failed")
STEP_LOG_TIMING = ("samples_per_second",)
"""Wall-clock fields of step-log lines: the only ones that differ between two runs of the same command."""
SETUP_FILE = "setup.json"  # also what makes an output dir ours (io.claim_folder)
REPORTED_METRICS = ("samples_per_second", "peak_memory_gb", "micro_f1", "macro_f1",
                    "precision_at_1", "precision_at_3", "precision_at_5")


class SetupMismatch(RuntimeError):
    pass


def run_id(experiment: str, config: str, seed: int, setup_fingerprint: str) -> str:
    """Stable across re-runs of the same command, so a re-run can find its checkpoint and row."""
    return f"{experiment}-{config}-seed{seed}-{setup_fingerprint[:8]}"


def claim_output_dir(output_dir: str | Path, setup_fingerprint: str, setup: dict) -> None:
    """An output dir belongs to one setup (everything but config and seed): mixing setups in one
    results.jsonl would average incomparable runs. Refuse with one line instead, and refuse a folder that
    is not ours at all (`claim_folder`). Checked and claimed under one lock, so that two setups started
    at the same moment cannot both claim it."""
    output_dir = Path(output_dir)
    claim_folder(output_dir, SETUP_FILE, "fingerprint")  # before creating the lock's folder
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with lock(output_dir.parent / f".{output_dir.name}.setup.lock"):
        claim_folder(output_dir, SETUP_FILE, "fingerprint")
        marker = output_dir / SETUP_FILE
        if not marker.exists():  # absent or empty: it appears with its setup.json, never half-claimed
            with atomic_directory(output_dir, SETUP_FILE, "fingerprint") as tmp:
                atomic_write_json(tmp / SETUP_FILE, {"fingerprint": setup_fingerprint, "setup": setup})
            return
        existing = json.loads(marker.read_text())
    if existing.get("fingerprint") != setup_fingerprint:
        differing = sorted(k for k in set(setup) | set(existing.get("setup", {}))
                           if setup.get(k) != existing.get("setup", {}).get(k))
        raise SetupMismatch(
            f"{output_dir} holds results of a different setup (differs in: {', '.join(differing) or '?'}); "
            "pass another --output_dir"
        )


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
    }


def append_result(output_dir: str | Path, row: dict) -> None:
    if row.get("status") not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {row.get('status')!r}")
    append_jsonl(Path(output_dir) / "results.jsonl", row)


def latest_per_run(rows: Iterable[dict]) -> dict[str, dict]:
    """run_id -> the run's newest row (a retried or restarted run appends a new row; the newest counts)."""
    return {row["run_id"]: row for row in rows if "run_id" in row}


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}")  # names a step log and a checkpoint folder: never a path
ROW_TYPES = {"run_id": str, "status": str, "experiment": str, "config": str, "seed": int, "setup_fingerprint": str,
             "steps": int, "precision": dict, "train_config": dict, "env": dict, "error": str, "reason": str}
REQUIRED = ("run_id", "status")


def row_problem(row: dict) -> str | None:
    """What makes a results row unusable (a missing or wrong-typed field, a run id that is not a plain name, an
    unknown status), or None: such a row is reported as a malformed line, never read."""
    for key in REQUIRED:
        if key not in row:
            return f"no {key}"
    for key, kind in ROW_TYPES.items():
        value = row.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            return f"{key} is {type(value).__name__}, not {kind.__name__}"
    if not RUN_ID.fullmatch(row["run_id"]):
        return f"run_id {row['run_id'][:60]!r} is not a plain name of at most 200 letters, digits and _.+-"
    if row["status"] not in STATUSES:
        return f"status {row['status'][:40]!r} is not one of {', '.join(STATUSES)}"
    return None


def read_results(output_dir: str | Path) -> tuple[list[dict], list[str]]:
    """All valid rows, and a list of problems (malformed or invalid lines with file:line) that callers must
    surface."""
    return read_jsonl(Path(output_dir) / "results.jsonl", validate=row_problem)


class StepLog:
    """A run's JSONL step log. Lines are flushed as written; values are kept as they are (NaN stays NaN).
    `views` (dtype_bench.reporting: TensorBoard, W&B) receive every record written, after the line."""

    def __init__(self, path: str | Path, *, append: bool = False, resume_at: int | None = None,
                 views: Iterable = ()):
        """`resume_at`: a byte offset from `offset()`; the log is cut back to it (lines written after the
        checkpoint that recorded it are dropped, as a resumed run writes them again) and appended to."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at is not None:
            fd = open_no_link(self.path, os.O_RDWR | os.O_CREAT)
            try:
                size = os.fstat(fd).st_size
                if size < resume_at:
                    raise ValueError(f"step log {self.path} has {size} bytes, fewer than the {resume_at} its "
                                     "checkpoint recorded; pass --fresh to start over")
                os.ftruncate(fd, resume_at)
            finally:
                os.close(fd)
        keep = append or resume_at is not None
        fd = open_no_link(self.path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if keep else os.O_TRUNC))
        self._file: IO[str] = open(fd, "a" if keep else "w", encoding="utf-8")
        self.views = list(views)
        first_step = None
        if self.views and (append or resume_at is not None):
            kept, _ = read_jsonl(self.path)
            first_step = 1 + max((r["step"] for r in kept if isinstance(r.get("step"), int)), default=0)
        for view in self.views:
            view.open(first_step)  # a resumed view drops what it holds from first_step on, as the log did
        fsync_dir(self.path.parent)  # the log's directory entry, which fsyncing the file does not persist

    def write(self, record: dict) -> None:
        self._file.write(json_dumps(record) + "\n")
        self._file.flush()
        for view in self.views:
            view.write(record)

    def offset(self) -> int:
        """Bytes written so far, made durable first: a checkpoint records this offset, and after a power cut
        the log must still hold them for the resume to continue it."""
        os.fsync(self._file.fileno())
        return self._file.tell()

    def close(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
        for view in self.views:
            view.close()


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None below two values) and count of the values that are not None: the
    one mean/std over seeds (the sweep's table, analysis' estimates). NaN and Inf are kept and propagate."""
    xs = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(xs):
        return None, None, 0
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else None, len(xs)
