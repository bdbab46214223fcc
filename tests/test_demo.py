"""`make demo`'s pieces: its corpus (prepare_demo), the fine-tuning preset's start from a checkpoint
(`--init_weights`) and what refuses a wrong one."""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_model
from transformers import AutoTokenizer

from dtype_bench import synthetic
import tiny_run
from experiments.classification import data, model as model_lib, prepare_data, run
from experiments.classification.config import PRESETS, TrainConfig


def classifier(num_labels: int, seed: int) -> model_lib.MultiLabelClassifier:
    torch.manual_seed(seed)
    encoder = model_lib.build_encoder("tiny", vocab_size=50, pad_token_id=1, max_length=16, tiny_layers=1,
                                      tiny_hidden=64)
    return model_lib.MultiLabelClassifier(encoder, num_labels, 0.0, torch.autocast, label_prior=None)


def test_init_weights_start_every_tensor_from_the_file_and_refuse_another_model(tmp_path):
    source, target = classifier(20, seed=0), classifier(20, seed=1)
    save_model(source, str(tmp_path / "model.safetensors"))
    assert not torch.equal(source.head.weight, target.head.weight)
    digest = model_lib.load_classifier_weights(target, str(tmp_path / "model.safetensors"))
    assert len(digest) == 64
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(model_lib.EncoderNotFound, match="not this model's"):
        model_lib.load_classifier_weights(classifier(21, seed=0), str(tmp_path / "model.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(model_lib.EncoderNotFound, match="not a readable safetensors file"):
        model_lib.load_classifier_weights(target, str(tmp_path / "junk.safetensors"))


def test_demo_preset_fine_tunes_a_checkpoint_only(tmp_path, capsys):
    with pytest.raises(ValueError, match="--init_weights"):
        TrainConfig(**PRESETS["demo"], preset="demo")
    pretrain, demo = (TrainConfig(**PRESETS[p], preset=p, init_weights="x") for p in ("demo_pretrain", "demo"))
    shared = ("model_name", "tiny_layers", "tiny_hidden", "max_length", "batch_size", "gradient_accumulation_steps")
    assert all(getattr(pretrain, f) == getattr(demo, f) for f in shared) and pretrain.cache_dir == demo.cache_dir
    assert demo.learning_rate < pretrain.learning_rate and not demo.compile_model
    cache = prepare_data.prepare("synthetic", tmp_path / "cache", tokenizer="bpe:300", max_length=32,
                                 synthetic_docs=20, synthetic_labels=10)
    capsys.readouterr()
    assert run.main(["--preset", "demo", "--config", "fp32_baseline", "--init_weights", str(tmp_path / "none"),
                     "--data_dir", str(cache), "--output_dir", str(tmp_path / "out")]) == 2
    assert "--init_weights" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_compile_model_false_overrides_a_config_that_compiles():
    assert tiny_run.parse_config(tiny_run.load_config_module("classification"),
                                 ["--preset", "tiny", "--compile_model", "false"]).compile_model is False
    assert TrainConfig().compile_model is True


def test_demo_corpus_has_its_labels_and_one_token_per_concept_word(tmp_path):
    meta = data.read_meta(prepare_data.prepare_demo(tmp_path / "demo"))
    assert meta.raw["splits"] == {"train": 6400, "validation": 800, "test": 800}
    assert meta.num_labels == prepare_data.DEMO_LABELS and meta.max_length == 64
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "demo" / "tokenizer")
    concepts = synthetic.build_concepts(prepare_data.DEMO_LABELS, random.Random(0))  # generate_documents' stream
    words = [t for c in concepts for t in c.terms if " " not in t]
    assert all(len(tokenizer.tokenize(" " + w)) == 1 for w in words)


def test_fine_tuning_run_starts_from_a_pretraining_runs_checkpoint(tmp_path, capsys):
    """The two phases of `make demo` through run.main at toy size: phase 2's row names the checkpoint's SHA-256 and
    lists init_weights as a departure from the reference recipe (a fresh head on roberta-base)."""
    from dtype_bench.io import sha256_file

    cache = prepare_data.prepare("synthetic", tmp_path / "cache", tokenizer="bpe:300", max_length=32,
                                 synthetic_docs=40, synthetic_labels=10)
    small = ["--data_dir", str(cache), "--tiny_hidden", "64", "--max_length", "32", "--batch_size", "4",
             "--max_steps", "2", "--eval_steps", "2", "--threads", "1", "--diagnostics_every", "1"]
    assert run.main(["--preset", "demo_pretrain", "--config", "fp32_baseline", "--output_dir",
                     str(tmp_path / "pretrain"), *small]) == 0
    (checkpoint,) = (tmp_path / "pretrain" / "checkpoints").glob("*/best-step*/model.safetensors")
    assert run.main(["--preset", "demo", "--config", "bf16_naive", "--init_weights", str(checkpoint),
                     "--output_dir", str(tmp_path / "demo"), *small]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "demo" / "results.jsonl").read_text().splitlines()]
    assert row["status"] == "completed" and row["init_weights_sha256"] == sha256_file(checkpoint)
    assert row["recipe_departures"]["init_weights"] == {"value": str(checkpoint), "recipe": None}
    assert row["compiled"] is False and row["model_source"] == {"kind": "config", "name": "tiny"}
