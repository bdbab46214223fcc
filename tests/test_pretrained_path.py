"""The real users' path, offline: a tokenizer and a RoBERTa written by `save_pretrained` into local directories,
`prepare_data.py --tokenizer DIR` on the real EURLEX57K sample and `run.py --model_name DIR` end to end, in
process; and a hub id that cannot be reached offline is one line naming HF_HUB_OFFLINE and the local-copy remedy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, RobertaConfig, RobertaModel

from dtype_bench.io import sha256_file
from dtype_bench.tokenization import tokenizer_fingerprint, train_bpe_tokenizer
from experiments.classification import data, prepare_data, run
from experiments.classification.model import WEIGHT_FILE_SUFFIXES


@pytest.fixture(scope="module")
def pretrained_dirs(real_sample_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(tokenizer dir, model dir): a byte-level BPE trained on the sample's training texts and a 2-layer x 64
    RoBERTa with random weights, each written by save_pretrained as a downloaded checkpoint would be."""
    root = tmp_path_factory.mktemp("pretrained")
    texts = [json.loads(line)["title"] for line in (real_sample_dir / "train.jsonl").read_text().splitlines()]
    train_bpe_tokenizer(texts, 600, root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                           intermediate_size=128, max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id,
                           type_vocab_size=1)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(root / "model")
    return root / "tokenizer", root / "model"


def test_prepare_and_run_from_save_pretrained_directories(pretrained_dirs, real_sample_dir, tmp_path):
    tokenizer_dir, model_dir = pretrained_dirs
    cache = tmp_path / "cache"
    assert prepare_data.main(["--source", str(real_sample_dir), "--output_dir", str(cache),
                              "--tokenizer", str(tokenizer_dir), "--max_length", "64"]) == 0
    meta = data.read_meta(cache)
    assert meta.raw["tokenizer"]["name"] == str(tokenizer_dir)
    assert meta.raw["tokenizer"]["fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tokenizer_dir))
    assert meta.raw["source"]["kind"] != "synthetic" and meta.num_labels > 100

    out = tmp_path / "out"
    assert run.main(["--config", "fp32_baseline", "--model_name", str(model_dir), "--data_dir", str(cache),
                     "--max_length", "64", "--batch_size", "2", "--gradient_accumulation_steps", "1",
                     "--max_steps", "3", "--eval_steps", "3", "--max_eval_docs", "8", "--eval_batch_size", "4",
                     "--diagnostics_every", "0", "--threads", "1", "--output_dir", str(out)]) == 0
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["status"] == "completed" and row["train_config"]["model_name"] == str(model_dir)
    assert row["recipe_departures"]["model_name"] == {"value": str(model_dir), "recipe": "roberta-base"}
    source = row["model_source"]
    weight_files = sorted(f for f in model_dir.iterdir() if f.suffix in WEIGHT_FILE_SUFFIXES)
    assert weight_files and source["kind"] == "local" and source["path"] == str(model_dir.resolve())
    assert source["weights_sha256"] == {f.name: sha256_file(f) for f in weight_files}
    assert "commit_hash" in source  # None for a directory that is not a hub snapshot
    assert row["dtypes"]["body_params"] == ["float32"] and row["samples_seen"] == 6
    assert all(isinstance(row[k], float) for k in ("micro_f1", "macro_f1", "precision_at_1"))


def test_the_run_trains_the_saved_weights(pretrained_dirs):
    """What run.py builds from the directory is the saved model, weight for weight (not a fresh init)."""
    _, model_dir = pretrained_dirs
    from experiments.classification.model import build_encoder

    saved = AutoModel.from_pretrained(model_dir, add_pooling_layer=False).state_dict()
    built = build_encoder(str(model_dir), vocab_size=saved["embeddings.word_embeddings.weight"].shape[0],
                          pad_token_id=1, max_length=64, tiny_layers=1, tiny_hidden=64).state_dict()
    assert built.keys() == saved.keys()
    assert all(torch.equal(built[k], saved[k]) for k in saved)


def test_unreachable_hub_id_is_one_line_naming_hf_hub_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = prepare_data.prepare("synthetic", tmp_path / "cache", tokenizer="bpe:300", max_length=32,
                                 synthetic_docs=20, synthetic_labels=10)
    capsys.readouterr()
    code = run.main(["--config", "fp32_baseline", "--model_name", "no-such-owner/no-such-encoder",
                     "--data_dir", str(cache), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "HF_HUB_OFFLINE" in err and "--model_name DIR" in err and "save_pretrained" in err
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_tokenizer_is_one_line_naming_hf_hub_offline(tmp_path, capsys):
    assert prepare_data.main(["--source", "synthetic", "--output_dir", str(tmp_path / "cache"),
                              "--tokenizer", "no-such-owner/no-such-tokenizer"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE" in err and "save_pretrained(DIR)" in err
    assert not (tmp_path / "cache").exists()
