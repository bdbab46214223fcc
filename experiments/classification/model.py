"""Encoder + linear multi-label head, with the head's precision under the config's control."""
from __future__ import annotations

import math
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, RobertaConfig

from dtype_bench.io import sha256_file

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin")


class EncoderNotFound(ValueError):
    """The pretrained encoder cannot be loaded; the message is one line naming what to pass instead."""


def pretrained_config(model_name: str) -> PretrainedConfig:
    """The config of a hub id or local save_pretrained directory, or EncoderNotFound saying how to point at a
    local copy (offline, a hub id resolves only from the local Hugging Face cache). A name that can only be a
    path (starting with /, . or ~, or more than owner/name) and does not exist is refused as such."""
    if model_name.startswith(("/", ".", "~")) or model_name.count("/") > 1:
        if not Path(model_name).expanduser().exists():
            raise EncoderNotFound(f"--model_name {model_name}: no such directory (a path, not a hub id owner/name); "
                                  "pass a directory written by save_pretrained")
    try:
        return AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError) as e:
        if Path(model_name).is_dir():
            raise EncoderNotFound(f"--model_name {model_name}: a directory without a loadable config.json "
                                  f"({type(e).__name__}); pass a directory written by save_pretrained") from e
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise EncoderNotFound(
            f"--model_name {model_name}: not a local directory, and the Hugging Face hub id cannot be loaded"
            + (" with HF_HUB_OFFLINE=1 (only the local hub cache is read, and it is not there)" if offline
               else f" ({type(e).__name__})")
            + "; pass a local copy: --model_name DIR where DIR was written by save_pretrained (e.g. "
              f"AutoModel.from_pretrained('{model_name}').save_pretrained(DIR) on a machine with internet), "
              "or unset HF_HUB_OFFLINE where the hub can be reached") from e


def encoder_source(model_name: str, encoder: nn.Module) -> dict:
    """Where the encoder's weights came from, for the results row: `config` (built here, random weights),
    `local` (a save_pretrained directory: its path and the SHA-256 of its weight files) or `hub` (the id and the
    commit hash the hub cache resolved it to)."""
    if model_name == "tiny":
        return {"kind": "config", "name": model_name}
    commit = getattr(encoder.config, "_commit_hash", None)
    path = Path(model_name)
    if not path.is_dir():
        return {"kind": "hub", "name": model_name, "commit_hash": commit}
    weights = {f.name: sha256_file(f) for f in sorted(path.iterdir()) if f.suffix in WEIGHT_FILE_SUFFIXES}
    return {"kind": "local", "name": model_name, "path": str(path.resolve()), "commit_hash": commit,
            "weights_sha256": weights}


def load_classifier_weights(model: nn.Module, path: str) -> str:
    """Load a classifier's state (every key of `model`, same shapes: the same encoder and label space) from a
    safetensors file; returns the file's SHA-256 for the results row."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (OSError, ValueError, SafetensorError) as e:
        raise EncoderNotFound(f"--init_weights {path}: not a readable safetensors file ({e})") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        differ = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise EncoderNotFound(f"--init_weights {path}: its tensors are not this model's (first differences: "
                              f"{differ}); it must come from a run of the same model size on the same cache")
    model.load_state_dict(state)
    return sha256_file(path)


def build_encoder(model_name: str, *, vocab_size: int, pad_token_id: int, max_length: int,
                  tiny_layers: int, tiny_hidden: int) -> nn.Module:
    """Any HF encoder via AutoModel with SDPA attention; 'tiny' builds a small RoBERTa from a config."""
    if model_name == "tiny":
        config = RobertaConfig(
            vocab_size=vocab_size, hidden_size=tiny_hidden, num_hidden_layers=tiny_layers,
            num_attention_heads=tiny_hidden // 64, intermediate_size=4 * tiny_hidden,
            # RoBERTa numbers positions from pad_token_id + 1, so it needs max_length + 2 position slots.
            max_position_embeddings=max_length + 2, pad_token_id=pad_token_id, type_vocab_size=1,
        )
        return AutoModel.from_config(config, attn_implementation="sdpa", add_pooling_layer=False)
    config = pretrained_config(model_name)
    if vocab_size > config.vocab_size:
        raise ValueError(f"cache tokenizer has {vocab_size} tokens but {model_name} only {config.vocab_size}")
    return AutoModel.from_pretrained(model_name, attn_implementation="sdpa", add_pooling_layer=False)


class MultiLabelClassifier(nn.Module):
    """encoder -> first-token (<s>) representation -> dropout -> Linear(hidden, num_labels).

    The head may hold a different dtype from the body (fp32 head configs); its input is cast to the head's
    dtype, and it runs inside `head_autocast()` (`precision.head_autocast`: autocast off for the configs that
    compute the head in fp32, so logits and head grads are fp32).

    Without `label_prior` the head is a plain nn.Linear with its default initialisation (the reference recipe).
    `label_prior` (the average fraction of labels that are positive, ~5/4,271) sets the head bias to its
    log-odds, so every sigmoid starts at the base rate instead of 0.5. With a zero bias, AdamW moves each of the
    thousands of biases by about lr per step; the network instead collapses its representation to push all
    logits down at once, and a from-scratch encoder then sits at the label-frequency baseline for hundreds of
    steps (PLAN.md, "Offline tiny preset", has the measurement).
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float,
                 head_autocast: Callable[[], AbstractContextManager], label_prior: float | None = None):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        if label_prior is not None:
            if not 0 < label_prior < 1:
                raise ValueError(f"label_prior must be in (0, 1), got {label_prior}")
            nn.init.constant_(self.head.bias, math.log(label_prior / (1 - label_prior)))
        self.head_autocast = head_autocast

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = self.dropout(hidden[:, 0])
        with self.head_autocast():
            return self.head(pooled.to(self.head.weight.dtype))


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean BCE-with-logits computed in `dtype` whatever the logits' dtype (`PrecisionConfig.loss_dtype`)."""
    return F.binary_cross_entropy_with_logits(logits.to(dtype), targets.to(dtype))


def param_groups(model: MultiLabelClassifier, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not biases or LayerNorm), as in BERT/RoBERTa fine-tuning."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "LayerNorm" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def parameter_group_of(name: str) -> str:
    """Which diagnostic group a parameter belongs to: embeddings, encoder or head."""
    if name.startswith("head."):
        return "head"
    return "embeddings" if ".embeddings." in f".{name}" else "encoder"
