"""Fixtures shared by the test modules."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_sample_dir() -> Path:
    """The shared 200-document EURLEX57K sample (train.jsonl, dev.jsonl), kept outside the repo; tests that
    need it are skipped where it is absent (e.g. a bare CI clone)."""
    path = (Path(__file__).parents[1] / "../shared/data/eurlex57k-sample").resolve()
    if not (path / "train.jsonl").is_file():
        pytest.skip(f"real EURLEX57K sample not found at {path}")
    return path
