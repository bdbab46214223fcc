"""The full-size offline shape: token-id corpora + the words:SIZE tokenizer give back exactly the generated ids,
the synthetic_full presets build roberta-base's and GPT-2 124M's exact shapes (checked against the published
parameter counts, not against our own code), and the caches say what they are."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_run
from dtype_bench import synthetic
from dtype_bench.tokenization import TokenizerError, load_tokenizer


from experiments.classification import data as data_lib
from experiments.classification import model as cls_model
from experiments.classification import prepare_data
from experiments.lm import model as lm_model

CLASSIFICATION = tiny_run.load_config_module("classification")
LM = tiny_run.load_config_module("lm")

ROBERTA_BASE_PARAMETERS = 124_645_632
"""roberta-base's published parameter count, pooler included (the hub model card / `num_parameters()`)."""
ROBERTA_POOLER_PARAMETERS = 768 * 768 + 768
"""We build the encoder without the pooler (the head reads the <s> position itself)."""
GPT2_SMALL_PARAMETERS = 124_439_808
"""GPT-2 small's published count (50,257-token tied embedding); ours pads the vocabulary to 50,304 as nanoGPT."""


def test_the_words_tokenizer_gives_back_the_generated_ids():
    texts = synthetic.token_id_texts(20, vocab_size=1000, lengths="eurlex_sample", num_labels=7, seed=3)
    tokenizer = load_tokenizer("words:1000")
    for text, labels in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.cls_token_id == 0 and ids[-1] == tokenizer.sep_token_id == 2
        assert ids[1:-1] == [int(word.removeprefix("w")) for word in text.split()]  # w<i> -> i, nothing else
        assert all(5 <= i < 1000 for i in ids[1:-1]) and 1 <= len(labels) <= 12
    assert len(tokenizer) == 1000 and tokenizer.pad_token_id == 1
    with pytest.raises(TokenizerError):
        load_tokenizer("words:x")


def test_token_id_lengths_fill_512_or_follow_the_eurlex_sample():
    rng = np.random.default_rng(0)
    assert (synthetic.token_id_lengths(100, "filling", rng) > 512).all()
    lengths = synthetic.token_id_lengths(20_000, "eurlex_sample", rng)
    recorded = np.array(synthetic.EURLEX_SAMPLE_LENGTH_PERCENTILES)
    drawn = np.percentile(lengths, np.linspace(0, 100, len(recorded)))
    assert np.abs(drawn[1:-1] / recorded[1:-1] - 1).max() < 0.05  # inner percentiles; the extremes are noisy
    assert 0.30 < (lengths <= 512).mean() < 0.42  # 36% of the real documents fit in 512 tokens


def test_recorded_eurlex_lengths_are_the_real_samples(real_sample_dir, tmp_path):
    """Re-measure EURLEX_SAMPLE_LENGTH_PERCENTILES as their docstring says they were measured."""
    cache = prepare_data.prepare(str(real_sample_dir), tmp_path / "sample", tokenizer="bpe:8000", max_length=100_000)
    lengths = np.concatenate([np.diff(np.load(cache / f"{split}.doc_offsets.npy"))
                              for split in ("train", "validation", "test")])
    percentiles = np.percentile(lengths, np.linspace(0, 100, len(synthetic.EURLEX_SAMPLE_LENGTH_PERCENTILES)))
    assert [int(p) for p in percentiles] == list(synthetic.EURLEX_SAMPLE_LENGTH_PERCENTILES)


@pytest.mark.parametrize("source, all_full", [("synthetic-ids", True), ("synthetic-ids-eurlex-lengths", False)])
def test_token_id_cache_holds_every_label_and_says_what_it_is(tmp_path, source, all_full):
    cache = prepare_data.prepare(source, tmp_path / "cache", tokenizer="words:3000", max_length=512,
                                 synthetic_docs=200, synthetic_labels=150)
    meta = data_lib.read_meta(cache)
    assert meta.num_labels == 150 and meta.vocab_size == 3000 and meta.max_length == 512
    lengths = data_lib.TokenizedSplit(cache, "train", 512).lengths()
    # every document fills 512 tokens, or the real sample's shortest is 204 and a third are under 512
    assert (lengths == 512).all() if all_full else (lengths.min() >= 204 and 0.2 < (lengths < 512).mean() < 0.5)
    source_record = json.loads((cache / "meta.json").read_text())["source"]
    assert source_record["kind"] == source and "eurlex57k" not in json.dumps(source_record).lower()
    with pytest.raises(prepare_data.PrepareError, match="words:SIZE"):
        prepare_data.prepare(source, tmp_path / "other", tokenizer="bpe:1000", synthetic_docs=200,
                             synthetic_labels=150)


def test_synthetic_full_presets_are_roberta_base_and_gpt2_small():
    for preset in ("synthetic_full", "synthetic_full_eurlex_lengths"):
        cfg = CLASSIFICATION.TrainConfig(preset=preset, **CLASSIFICATION.PRESETS[preset])
        assert (cfg.max_length, cfg.batch_size, cfg.gradient_accumulation_steps) == (512, 8, 4)
        with torch.device("meta"):
            encoder = cls_model.build_encoder(cfg.model_name, vocab_size=synthetic.ROBERTA_BASE_VOCAB_SIZE,
                                              pad_token_id=1, max_length=cfg.max_length, tiny_layers=cfg.tiny_layers,
                                              tiny_hidden=cfg.tiny_hidden)
        c = encoder.config
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size, c.vocab_size,
                c.max_position_embeddings, c.type_vocab_size) == (12, 768, 12, 3072, 50_265, 514, 1)
        assert sum(p.numel() for p in encoder.parameters()) == ROBERTA_BASE_PARAMETERS - ROBERTA_POOLER_PARAMETERS

    lm = LM.TrainConfig(preset="synthetic_full", **LM.PRESETS["synthetic_full"])
    assert (lm.block_size, lm.batch_size, lm.gradient_accumulation_steps) == (1024, 12, 5)
    with torch.device("meta"):
        gpt2 = lm_model.build_gpt2(synthetic.GPT2_VOCAB_SIZE, n_layer=lm.n_layer, n_head=lm.n_head, n_embd=lm.n_embd,
                                   block_size=lm.block_size, dropout=lm.dropout, eos_token_id=2)
    padding_rows = lm_model.padded_vocab_size(synthetic.GPT2_VOCAB_SIZE) - synthetic.GPT2_VOCAB_SIZE
    assert sum(p.numel() for p in gpt2.parameters()) == GPT2_SMALL_PARAMETERS + padding_rows * 768
