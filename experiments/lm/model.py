"""GPT-2 (HF `GPT2LMHeadModel` built from a config, SDPA attention, tied embeddings) with its output layer
under the precision config's control.

"The head" of the LM is the output projection hidden -> vocabulary, the counterpart of the classification
head. GPT-2 ties it to the token embedding: `lm_head.weight` *is* `transformer.wte.weight`. So a config
that keeps the head's weights in fp32 keeps the tied embedding in fp32 too (one matrix, one dtype, one
AdamW state), and the embedding lookup's output is cast to the body's dtype before the first block.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

VOCAB_MULTIPLE = 64  # pad the vocabulary as nanoGPT does (50,257 -> 50,304): matmul-friendly shapes


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_gpt2(vocab_size: int, *, n_layer: int, n_head: int, n_embd: int, block_size: int, dropout: float,
               eos_token_id: int) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 (GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2L))."""
    # Imported here: HF's modeling code pulls in torchao (seconds, and library-load messages on stderr),
    # which a command line that fails on a bad flag should not pay for.
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=padded_vocab_size(vocab_size), n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise RuntimeError("GPT2LMHeadModel did not tie lm_head to the token embedding")
    return model


class CausalLM(nn.Module):
    """token ids -> GPT-2 body -> output layer (tied embedding) -> logits over the padded vocabulary.

    The output layer's input is cast to its weight dtype, and it runs inside `head_autocast()`
    (`precision.head_autocast`: autocast off for the configs that compute the head in fp32, so the 50k-wide
    logits and the head's gradients are fp32).
    """

    def __init__(self, gpt2: GPT2LMHeadModel, head_autocast: Callable[[], AbstractContextManager]):
        super().__init__()
        self.gpt2 = gpt2
        self.head_autocast = head_autocast

    @property
    def head(self) -> nn.Module:
        """The output layer; its weight is the token embedding."""
        return self.gpt2.lm_head

    def body(self) -> nn.ModuleList:
        """Everything but the tied embedding/output matrix (a view for casting and dtype checks)."""
        t = self.gpt2.transformer
        return nn.ModuleList([t.wpe, t.h, t.ln_f])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        body_dtype = self.gpt2.transformer.wpe.weight.dtype
        embeds = self.gpt2.transformer.wte(input_ids).to(body_dtype)  # fp32 tied embedding, bf16 body
        hidden = self.gpt2.transformer(inputs_embeds=embeds).last_hidden_state
        with self.head_autocast():
            return self.head(hidden.to(self.head.weight.dtype))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean next-token cross-entropy over the vocabulary, computed in `dtype` whatever the logits' dtype
    (`PrecisionConfig.loss_dtype`)."""
    return F.cross_entropy(logits.to(dtype).flatten(0, 1), targets.flatten())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (embeddings and linear weights), not on biases and LayerNorm gains,
    as GPT-2 / nanoGPT do. The tied matrix is listed once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def parameter_group_of(name: str) -> str:
    """Diagnostic group of a parameter of `CausalLM`: the tied token-embedding/output matrix is the head,
    the position embedding is the embeddings, everything else (blocks, final LayerNorm) the decoder."""
    if name.endswith(("wte.weight", "lm_head.weight")):
        return "head"
    return "embeddings" if ".wpe." in name else "decoder"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
