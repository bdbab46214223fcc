"""Training configuration of the language-modelling experiment: one typed dataclass, its presets.

`full` is the issue's experiment (GPT-2 small from scratch on OpenWebText, nanoGPT's recipe, 10k
iterations); `tiny` is the offline embedded default (a few-layer GPT-2 on the synthetic legal corpus with a
locally trained byte-level BPE) sized so that validation loss clearly drops within a couple of minutes per
config on 2 CPU cores; `synthetic_full` is the full experiment's shape (GPT-2 124M, block 1,024, batch 12 x 5)
on random token ids at GPT-2's vocabulary size, for speed and memory offline (its rows say so in `data`; its
losses mean nothing). Any flag overrides any preset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

from dtype_bench.configs import TrainingFields


@dataclass(frozen=True)
class TrainConfig(TrainingFields):
    """Training fields of the language-modelling experiment (defaults: the --preset's)."""

    preset: Literal["tiny", "full", "synthetic_full"] = "full"
    """Which defaults to start from: the full GPT-2 small experiment, the offline tiny one, or the full shape on
    synthetic token ids."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads per block (n_embd must be a multiple)."""
    n_embd: int = 768
    """Hidden size."""
    block_size: int = 1024
    """Context length: tokens per training sequence (and the model's position embeddings)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residuals (0 for pre-training, as nanoGPT)."""
    data_dir: Optional[str] = None
    """Prepared cache (prepare_data.py); default by preset: data/lm/openwebtext (full), data/lm/tiny, data/lm/synthetic_ids
    (built offline on first use but for full)."""
    output_dir: str = "results/lm"
    """Where results.jsonl and logs/ go."""
    batch_size: int = 12
    """Micro-batch size (sequences per forward/backward)."""
    gradient_accumulation_steps: int = 5
    """Micro-batches per optimizer step: effective batch = batch_size x this, whatever the world size (under
    torchrun each of N ranks computes this / N of them; N must divide it)."""
    max_steps: int = 10_000
    """Optimizer steps (iterations) to train."""
    eval_steps: int = 500
    """Evaluate validation loss every this many optimizer steps, and at the end."""
    eval_sequences: Optional[int] = 2400
    """Validation sequences (fixed non-overlapping windows of val.bin) per evaluation; None = all of them."""
    eval_batch_size: int = 12
    """Sequences per evaluation batch."""
    learning_rate: float = 6e-4
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to learning_rate x this at max_steps."""
    warmup_ratio: float = 0.05
    """Fraction of max_steps of linear warm-up before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, on matrices only (not biases and LayerNorm gains)."""
    adam_beta2: float = 0.95
    """AdamW beta2 (GPT-2 / nanoGPT's 0.95)."""
    diagnostics_every: int = 10
    """Measure update fidelity, lost updates and underflow (dtype_bench.diagnostics) on step 1 and every this
    many optimizer steps; 0 = never. Non-finite tracking runs every step."""

    forecast: Optional[float] = None
    """Train on max_steps's learning-rate schedule but stop after ceil(this x max_steps) optimizer steps, with a
    validation evaluation there: the first fraction of a full run, step for step (`dtype-bench forecast`). Its
    rows go to <output_dir>-forecast, a setup of their own (the fraction is part of it), so a full sweep into
    <output_dir> never meets them; None trains to max_steps."""

    REFERENCE_RECIPE: ClassVar[dict[str, Any]] = dict(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, batch_size=12, gradient_accumulation_steps=5,
        max_steps=10_000, eval_steps=500, eval_sequences=2400, learning_rate=6e-4, min_lr_ratio=0.1, warmup_ratio=0.05,
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, grad_clip=1.0,
    )
    """PLAN.md's recipe (nanoGPT's GPT-2 small, shortened to 10,000 steps): the full preset is exactly this; any
    other value is a departure (`TrainingFields.recipe_departures`)."""

    def __post_init__(self) -> None:
        if self.forecast is not None and not 0 < self.forecast < 1:
            raise ValueError(f"--forecast must be a fraction in (0, 1), got {self.forecast}")
        self.check_training_fields("n_layer", "n_head", "n_embd", "block_size")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n_embd ({self.n_embd}) must be a multiple of --n_head ({self.n_head})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.eval_sequences is not None and self.eval_sequences <= 0:
            raise ValueError(f"--eval_sequences must be positive, got {self.eval_sequences}")

    @property
    def cache_dir(self) -> str:
        return self.data_dir or CACHE_DIRS[self.preset]


CACHE_DIRS = {"full": "data/lm/openwebtext", "tiny": "data/lm/tiny", "synthetic_full": "data/lm/synthetic_ids"}
"""Default prepared cache per preset; all but `full` are built offline on first use (prepare_data.py)."""


PRESETS: dict[str, dict] = {
    "full": {},
    # A 4 x 128 GPT-2 (~0.8M decoder parameters + the 4096 x 128 tied embedding) over 128-token windows of the
    # synthetic corpus: 2,048 tokens per step, 150 steps = 0.3M tokens (~15% of the training stream).
    # A randomly initialised small model wants a far larger learning rate than GPT-2 small's 6e-4.
    "tiny": dict(
        n_layer=4, n_head=2, n_embd=128, block_size=128, batch_size=16, gradient_accumulation_steps=1,
        max_steps=150, eval_steps=50, eval_sequences=128, eval_batch_size=32, learning_rate=2e-3,
        warmup_ratio=0.1,
    ),
    "synthetic_full": {},  # the full shape; the vocabulary (50,257) comes from the cache's words:50257 tokenizer
}
