"""benchmarks/: the Trainer side gets exactly our micro-batches (identical work), and the script prints its table.
No speed is asserted: the numbers are the benchmark's output, not a test's."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import tiny_run


from experiments.classification import data as data_lib
from benchmarks import vs_hf_trainer
from experiments.classification.config import TrainConfig
from dtype_bench import precision


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tiny_run.small_cache(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("length_grouped", [False, True])
def test_trainer_dataloader_yields_our_micro_batches_across_epochs(cache, tmp_path, length_grouped):
    cfg = TrainConfig(preset="tiny", model_name="tiny", tiny_layers=1, tiny_hidden=64, data_dir=str(cache),
                      max_length=64, batch_size=8, gradient_accumulation_steps=2, max_steps=40,
                      length_grouped_batches=length_grouped)
    meta = data_lib.read_meta(cache)
    split = data_lib.TokenizedSplit(cache, "train", cfg.max_length)
    n_docs = cfg.max_steps * cfg.effective_batch_size  # 640 > 480 training documents: two epochs
    trainer = vs_hf_trainer.build_trainer(cfg, precision.get("fp32_baseline"), 0, torch.device("cpu"),
                                          str(tmp_path), callbacks=[])
    ours = data_lib.TrainBatches(split, cfg.batch_size, 0, meta.num_labels, meta.pad_token_id,
                                 length_grouped=length_grouped)
    n_batches = 0
    for theirs in trainer.get_train_dataloader():
        mine = next(ours)
        assert torch.equal(theirs["input_ids"].cpu(), mine.input_ids)
        assert torch.equal(theirs["labels"].cpu(), mine.targets)
        n_batches += 1
    assert n_batches == n_docs // cfg.batch_size and ours.epoch == 1


@pytest.mark.parametrize("config, mismatch", [
    ("amp_bf16", None),
    # accelerate on CPU: the fp16 flag enables neither autocast nor a GradScaler, so the Trainer trains in fp32
    ("amp_fp16", "logits float32 != float16; GradScaler not used"),
])
def test_the_precision_the_trainer_really_ran_is_checked(cache, tmp_path, config, mismatch):
    cfg = TrainConfig(preset="tiny", model_name="tiny", tiny_layers=1, tiny_hidden=64, data_dir=str(cache),
                      max_length=64, batch_size=4, gradient_accumulation_steps=1, max_steps=1)
    pc, device = precision.get(config), torch.device("cpu")
    trainer = vs_hf_trainer.build_trainer(cfg, pc, 0, device, str(tmp_path), callbacks=[])
    trainer.train()
    assert vs_hf_trainer.precision_mismatch(trainer, pc, device) == mismatch


@pytest.mark.slow
def test_benchmark_prints_the_ratio_table_with_the_length_grouped_column(cache):
    proc = subprocess.run(
        [sys.executable, str(tiny_run.ROOT / "benchmarks" / "vs_hf_trainer.py"), "--configs",
         "fp32_baseline,bf16_sr_fp32_moments,amp_fp16_no_loss_scaling", "--rounds", "1", "--max_steps", "3", "--timing_warmup_steps", "1",
         "--compare_length_grouping", "--data_dir", str(cache), "--tiny_layers", "1", "--tiny_hidden", "64",
         "--max_length", "64", "--threads", "1"],
        env=tiny_run.ENV, cwd=tiny_run.ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("config "))
    assert "ratio" in lines[header] and "grouped samples/s" in lines[header]
    fp32 = next(line for line in lines[header:] if line.startswith("fp32_baseline")).split()
    # The table must be built from the runs measured in the rounds (printed as they finish), each side in its
    # own column: with one round, each column is that round's value and the ratio is ours / the Trainer's.
    rounds = dict(re.findall(r"^fp32_baseline round 1 (ours|Trainer|ours, length-grouped)\s*: ([\d.]+) samples/s",
                             proc.stdout, flags=re.M))
    assert float(fp32[1]) == float(rounds["ours"]) and float(fp32[2]) == float(rounds["Trainer"])
    assert float(fp32[7]) == float(rounds["ours, length-grouped"])
    assert float(fp32[3]) == pytest.approx(float(rounds["ours"]) / float(rounds["Trainer"]), abs=0.006)
    ours_mfu, trainer_mfu = float(fp32[4].rstrip("%")), float(fp32[5].rstrip("%"))  # same FLOPs and peak
    assert ours_mfu / trainer_mfu == pytest.approx(float(rounds["ours"]) / float(rounds["Trainer"]), rel=0.02)
    assert any(line.startswith("bf16_sr_fp32_moments") and "not expressible: Trainer has no flag for low-precision"
               in line for line in lines[header:])
    # a name longer than the others widens the name column instead of pushing its row out of line
    no_scaling = next(line for line in lines[header:] if line.startswith("amp_fp16_no_loss_scaling"))
    assert "not expressible: Trainer's fp16 flag always scales the loss" in no_scaling
    name_width = len("amp_fp16_no_loss_scaling") + 1
    assert lines[header][name_width:].startswith("ours samples/s".rjust(15))
    assert no_scaling[name_width:].startswith("not expressible")
    assert "threads: 1" in proc.stdout and "x target)" in proc.stdout
