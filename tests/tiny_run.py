"""End-to-end helpers: run experiments/classification/run.py on a small synthetic cache, read what it wrote.

The model and data are as small as the point of each test allows (1 layer, hidden 64, 64 tokens, 600
documents), so a whole run is a few seconds of training plus the interpreter start-up.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from dtype_bench import configs

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "experiments" / "classification" / "run.py"
THREADS = int(os.environ.get("DTYPE_BENCH_TEST_THREADS", "1"))
"""Torch threads of every run the tests start, in this process or in a subprocess (conftest pins the rest):
never what the machine's momentary load would pick. `DTYPE_BENCH_TEST_THREADS=2 make test` runs the suite at two."""
PINNED = ["--threads", str(THREADS)]
SMALL = ["--preset", "tiny", "--tiny_layers", "1", "--tiny_hidden", "64", "--max_length", "64",
         "--max_eval_docs", "32", "--batch_size", "4", "--gradient_accumulation_steps", "2", *PINNED]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(THREADS)}


def small_cache(directory: Path) -> Path:
    from experiments.classification.prepare_data import prepare

    return prepare("synthetic", directory, tokenizer="bpe:1000", max_length=64, synthetic_docs=600,
                   synthetic_labels=300)


def command(cache: Path, output_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, str(RUN), *SMALL, "--data_dir", str(cache), "--output_dir", str(output_dir), *flags]


def run(cache: Path, output_dir: Path, *flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(cache, output_dir, *flags), env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def start(cache: Path, output_dir: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(command(cache, output_dir, *flags), env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def rows(output_dir: Path) -> list[dict]:
    path = output_dir / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def step_log(output_dir: Path, run_id: str) -> list[str]:
    return (output_dir / "logs" / f"{run_id}.jsonl").read_text().splitlines()


def without_timing(records: list[dict]) -> list[dict]:
    """Step-log records less their wall-clock fields: equal for two runs of the same command (a resumed one too)."""
    from dtype_bench.results import STEP_LOG_TIMING

    return [{k: v for k, v in r.items() if k not in STEP_LOG_TIMING} for r in records]


def logged_steps(output_dir: Path) -> int:
    """Highest optimizer step in the (single) step log so far; 0 before the first line."""
    logs = list((output_dir / "logs").glob("*.jsonl")) if (output_dir / "logs").exists() else []
    steps = [json.loads(line)["step"] for path in logs for line in path.read_text().splitlines()
             if line.endswith("}")]
    return max(steps, default=0)


def setup(cache: Path, output_dir: Path, *flags: str) -> tuple[str, dict]:
    """The setup fingerprint and record run.py computes under these flags (config and seed excluded)."""
    import torch

    from dtype_bench import runner

    config_module = load_config_module("classification")
    argv = [*SMALL, "--data_dir", str(cache), "--output_dir", str(output_dir), "--config", "fp32_baseline", *flags]
    _, cfg = runner.parse_args(None, config_module.TrainConfig, config_module.PRESETS, argv)
    data_fingerprint = json.loads((cache / "meta.json").read_text())["fingerprint"]
    return runner.setup_of(cfg.to_record(), data_fingerprint, torch.device("cpu"))


def run_id(cache: Path, output_dir: Path, config: str, seed: int, *flags: str) -> str:
    """The run id run.py gives (config, seed) under these flags, computed the way run.py does."""
    from dtype_bench import results

    return results.run_id("classification", config, seed, setup(cache, output_dir, *flags)[0])


def parse_config(module, argv: list[str]):
    """An experiment's TrainConfig from command-line flags (and --preset), as run.py resolves it."""
    parser = configs.training_parser(None, module.TrainConfig, module.PRESETS, argv)
    return configs.parse(parser, module.TrainConfig, argv)[1]


def load_config_module(experiment: str):
    """experiments/<experiment>/config.py (the package experiments.<experiment>)."""
    return importlib.import_module(f"experiments.{experiment}.config")


def assert_mfu_is_per_device(one: dict, two: dict) -> None:
    """A 1-process row and a 2-rank row of the same run: the same model FLOPs per sample (each rank counts the
    samples and FLOPs it computed), the job's samples/s twice the per-device rate, and MFU = FLOPs per sample x
    per-device samples/s over one device's peak, which is the single-process MFU at the same per-device rate.
    (The timed rates themselves differ between the runs: two ranks share this machine's cores.)"""
    import pytest

    assert two["model_flops_per_sample"] == pytest.approx(one["model_flops_per_sample"], rel=1e-9)
    for row, world_size in ((one, 1), (two, 2)):
        per_device = row["samples_per_second_per_device"]
        assert row["samples_per_second"] == pytest.approx(world_size * per_device)
        assert row["mfu"] == pytest.approx(row["model_flops_per_sample"] * per_device / row["peak_flops_measured"])
