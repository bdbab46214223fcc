"""DDP under torchrun: the data sharding, the micro-batch bookkeeping, and a real 2-process gloo run equal to
a single process up to reduction order."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_run
from dtype_bench import distributed


def _data_module():
    spec = importlib.util.spec_from_file_location("classification_data", tiny_run.RUN.parent / "data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_ranks_together_see_exactly_the_single_process_micro_batches(small_cache_dir):
    data = _data_module()
    split = data.TokenizedSplit(small_cache_dir, "train", 64)
    accumulation, world_size, steps = 4, 2, 70  # 70 steps x 4 x 4 docs > 480: crosses an epoch boundary
    single = data.TrainBatches(split, 4, 7, 300, 1)
    ranks = [data.TrainBatches(split, 4, 7, 300, 1, rank=r, world_size=world_size) for r in range(world_size)]
    for step in range(steps):
        expected = [next(single).input_ids for _ in range(accumulation)]
        for r, batches in enumerate(ranks):
            world = distributed.World(rank=r, world_size=world_size)
            for local in range(world.local_accumulation(accumulation)):
                index = world.micro_batch_index(step, local, accumulation) - step * accumulation
                assert torch.equal(next(batches).input_ids, expected[index])
        assert ranks[0].position == ranks[1].position == single.position  # one checkpoint fits all ranks


def test_micro_batch_indices_cover_each_step_once():
    for world_size in (1, 2, 4):
        indices = sorted(distributed.World(rank=r, world_size=world_size).micro_batch_index(3, local, 4)
                         for r in range(world_size) for local in range(4 // world_size))
        assert indices == [12, 13, 14, 15]


def test_accumulation_must_divide_by_world_size():
    with pytest.raises(ValueError, match="not divisible by the world size 4"):
        distributed.World(rank=0, world_size=4).local_accumulation(6)


def test_reseed_depends_on_place_only():
    distributed.reseed(0, 0, 5)
    a = torch.rand(4)
    torch.rand(100)
    distributed.reseed(0, 0, 5)
    assert torch.equal(a, torch.rand(4))
    distributed.reseed(0, 0, 6)
    assert not torch.equal(a, torch.rand(4))


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path, small_cache_dir):
    flags = ["--config", "fp32_baseline", "--max_steps", "6", "--eval_steps", "3", "--log_every", "1"]
    single = tiny_run.run(small_cache_dir, tmp_path / "single", *flags)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *tiny_run.command(small_cache_dir, tmp_path / "ddp", *flags)[1:]],
        env=tiny_run.ENV, cwd=tiny_run.ROOT, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]

    (one,), ddp_rows = tiny_run.rows(tmp_path / "single"), tiny_run.rows(tmp_path / "ddp")
    assert len(ddp_rows) == 1 and ddp_rows[0]["world_size"] == 2 and one["world_size"] == 1
    (two,) = ddp_rows
    assert two["samples_seen"] == one["samples_seen"] == 6 * 2 * 4  # same effective batch
    log_one = [json.loads(line) for line in tiny_run.step_log(tmp_path / "single", one["run_id"])]
    log_two = [json.loads(line) for line in tiny_run.step_log(tmp_path / "ddp", two["run_id"])]
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one]  # rank 0 alone writes, once per step
    # Equal up to reduction order (an all-reduce of two halves vs accumulation in one process). Measured on
    # this 2-core CPU with 2 gloo ranks: identical to the last bit; 1e-4 allows other summation orders
    # (NCCL, more ranks) amplified by a few AdamW steps.
    for a, b in zip(log_one, log_two):
        for key in ("loss", "grad_norm", "max_abs_logit", "micro_f1"):
            if key in a:
                assert _close(a[key], b[key], 1e-4), (a["step"], key, a[key], b[key])
    for key in ("micro_f1", "macro_f1", "precision_at_1", "precision_at_5", "loss", "val_loss", "val_micro_f1"):
        assert _close(one[key], two[key], 1e-4), (key, one[key], two[key])
    assert two["best_val_step"] == one["best_val_step"]
    tiny_run.assert_mfu_is_per_device(one, two)
