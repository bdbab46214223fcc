"""Fixtures shared by the test modules."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

import tiny_run


def pytest_configure(config):
    """Every run a test starts uses `tiny_run.THREADS` torch threads, flags or not: in this process (run.py's
    main called in-process) and in every subprocess (OMP_NUM_THREADS, inherited), so no result or duration of
    the suite depends on how busy the machine is at that moment."""
    os.environ["OMP_NUM_THREADS"] = str(tiny_run.THREADS)
    torch.set_num_threads(tiny_run.THREADS)


@pytest.fixture(scope="session")
def real_sample_dir() -> Path:
    """The shared 200-document EURLEX57K sample (train.jsonl, dev.jsonl), kept outside the repo; tests that
    need it are skipped where it is absent (e.g. a bare CI clone)."""
    path = (Path(__file__).parents[1] / "../shared/data/eurlex57k-sample").resolve()
    if not (path / "train.jsonl").is_file():
        pytest.skip(f"real EURLEX57K sample not found at {path}")
    return path


@pytest.fixture(scope="session")
def small_cache_dir(tmp_path_factory) -> Path:
    """`tiny_run.small_cache`, built once for the session: the runs read it and never write it (a test that
    damages a cache copies it first)."""
    return tiny_run.small_cache(tmp_path_factory.mktemp("small_cache"))


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only: skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
