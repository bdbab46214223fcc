"""Training configuration of the classification experiment: one typed dataclass, its presets.

`full` is the plan's experiment (roberta-base on EURLEX57K); `tiny` is an offline default (a small RoBERTa
built from a config, a synthetic EUR-Lex-like corpus and a locally trained byte-level BPE) sized to learn within
minutes on a laptop CPU. `demo_pretrain` and `demo` are `make demo`'s two phases on a smaller synthetic corpus
(200 labels): one fp32 training of a 1-layer RoBERTa from scratch at a from-scratch learning rate, then every
precision config fine-tuning that checkpoint (`--init_weights`) at a fine-tuning learning rate, where an AdamW
update is a far smaller fraction of a weight than half a bf16 ulp, as in the full experiment (PLAN.md, "The
demo task"). `synthetic_full` is the full experiment's arithmetic with nothing to
download, for speed and memory on a GPU: a model of exactly roberta-base's shape built from a config (random
weights) and the 768 -> 4,271 head, on random token ids at roberta-base's vocabulary size whose documents all
fill 512 tokens; `synthetic_full_eurlex_lengths` the same with EURLEX57K's document lengths (for length-grouped
batches). Their rows say so (`data`); their quality numbers mean nothing. Any flag overrides any preset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

from dtype_bench.configs import TrainingFields


@dataclass(frozen=True)
class TrainConfig(TrainingFields):
    """Training fields of the classification experiment (defaults: the --preset's)."""

    preset: Literal["tiny", "demo_pretrain", "demo", "full", "synthetic_full", "synthetic_full_eurlex_lengths"] = "full"
    """Which defaults to start from: the plan's full experiment, the offline tiny one, the demo's two phases, or
    the full shape on synthetic token ids (see the module docstring)."""
    model_name: str = "roberta-base"
    """Hub id or local directory of the encoder; 'tiny' builds a RoBERTa from a config (random weights) of
    tiny_layers x tiny_hidden, roberta-base's shape at 12 x 768 with the cache's vocabulary and max_length 512."""
    init_weights: Optional[str] = None
    """A classifier's model.safetensors (a run's best-step checkpoint on this cache) whose weights start encoder
    and head, instead of the encoder's own weights and a fresh head: the demo fine-tunes every config from one
    fp32-trained checkpoint, as the full experiment fine-tunes from roberta-base's."""
    tiny_layers: int = 4
    """Encoder layers of the model built from a config (ignored for pretrained encoders)."""
    tiny_hidden: int = 256
    """Hidden size of the model built from a config (heads = hidden / 64, intermediate = 4 x hidden)."""
    data_dir: Optional[str] = None
    """Prepared cache (prepare_data.py); default by preset: data/classification/eurlex57k (full), .../tiny, .../demo
    (demo and demo_pretrain), .../synthetic_ids_512 and .../synthetic_ids_eurlex_lengths, built offline on first use but
    for full."""
    output_dir: str = "results/classification"
    """Where results.jsonl, logs/ and checkpoints/ go."""
    max_length: int = 512
    """Tokens per document (truncation; must not exceed the cache's length)."""
    batch_size: int = 8
    """Micro-batch size (documents per forward/backward)."""
    gradient_accumulation_steps: int = 4
    """Micro-batches per optimizer step: effective batch = batch_size x this, whatever the world size (under
    torchrun each of N ranks computes this / N of them; N must divide it)."""
    length_grouped_batches: bool = False
    """Batch training documents of similar length together (data.training_order): less padding, so faster
    when lengths vary (a third of the real sample's documents are under 512 tokens), but a different data order, so
    runs with and without it are different setups (it is part of the run id); off as in the seed."""
    max_steps: int = 5000
    """Optimizer steps to train."""
    eval_steps: int = 500
    """Evaluate on validation (and checkpoint) every this many optimizer steps, and at the end."""
    learning_rate: float = 2e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to biases and LayerNorm weights)."""
    warmup_ratio: float = 0.1
    """Fraction of max_steps of linear warm-up, followed by linear decay to 0."""
    head_bias_prior: bool = False
    """Initialise the head bias to the log-odds of the training label frequency (see model.py) instead of
    nn.Linear's default initialisation; off in the reference recipe, on in the tiny preset (which needs it to learn)."""
    dropout: float = 0.1
    """Dropout before the classification head (the encoder keeps its own config's dropout)."""
    eval_batch_size: int = 32
    """Documents per evaluation batch."""
    max_eval_docs: Optional[int] = None
    """Evaluate on at most this many validation/test documents (None = all)."""
    eval_precision: Literal["config", "fp32"] = "config"
    """Evaluate under the config's own precision, or with the weights upcast to fp32 and no autocast
    (`precision.eval_precision`; TF32 flags and float8 layers stay as trained)."""
    compile_model: bool = True
    """torch.compile the model where the precision config asks for it (`PrecisionConfig.compile`); false runs every
    config eagerly (the demo preset: on a CPU compiling a small model costs more than it saves, and each new
    evaluation shape recompiles). The row's `compiled` says what ran."""
    diagnostics_every: int = 10
    """Measure update fidelity, lost updates and underflow (dtype_bench.diagnostics) on step 1 and every this
    many optimizer steps; 0 = never. A measured step costs one extra fp32 AdamW step plus host copies of the
    weights and the intended update (see the diagnostics module); non-finite tracking runs every step."""

    forecast: Optional[float] = None
    """Train on max_steps's learning-rate schedule but stop after ceil(this x max_steps) optimizer steps, with a
    validation evaluation there: the first fraction of a full run, step for step (`dtype-bench forecast`). Its
    rows go to <output_dir>-forecast, a setup of their own (the fraction is part of it), so a full sweep into
    <output_dir> never meets them; None trains to max_steps."""

    REFERENCE_RECIPE: ClassVar[dict[str, Any]] = dict(
        model_name="roberta-base", max_length=512, batch_size=8, gradient_accumulation_steps=4, max_steps=5000,
        eval_steps=500, learning_rate=2e-5, weight_decay=0.01, warmup_ratio=0.1, grad_clip=1.0, dropout=0.1,
        adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, head_bias_prior=False, length_grouped_batches=False,
        max_eval_docs=None, eval_precision="config", init_weights=None,
    )
    """The reference recipe: RoBERTa-base + dropout + a fresh linear head with nn.Linear's default initialisation, the
    plan's training values, PyTorch's AdamW betas/eps, evaluation on every document under the config's precision.
    The full preset is exactly this; any other value is a departure (`TrainingFields.recipe_departures`)."""

    def __post_init__(self) -> None:
        if self.forecast is not None and not 0 < self.forecast < 1:
            raise ValueError(f"--forecast must be a fraction in (0, 1), got {self.forecast}")
        self.check_training_fields("tiny_layers", "tiny_hidden", "max_length")
        if self.tiny_hidden % 64:
            raise ValueError(f"--tiny_hidden must be a multiple of 64 (64-dim heads), got {self.tiny_hidden}")
        if self.max_eval_docs is not None and self.max_eval_docs <= 0:
            raise ValueError(f"--max_eval_docs must be positive, got {self.max_eval_docs}")
        if self.preset == "demo" and self.init_weights is None:
            raise ValueError("--preset demo fine-tunes a checkpoint: pass --init_weights (the best-step "
                             "model.safetensors of a --preset demo_pretrain run; `make demo` does both)")
        if self.preset == "full" and self.model_name == "tiny":
            raise ValueError("--model_name tiny belongs to --preset tiny")

    @property
    def cache_dir(self) -> str:
        return self.data_dir or CACHE_DIRS[self.preset]


CACHE_DIRS = {"full": "data/classification/eurlex57k", "tiny": "data/classification/tiny",
              "demo_pretrain": "data/classification/demo", "demo": "data/classification/demo",
              "synthetic_full": "data/classification/synthetic_ids_512",
              "synthetic_full_eurlex_lengths": "data/classification/synthetic_ids_eurlex_lengths"}
"""Default prepared cache per preset; all but `full` are built offline on first use (prepare_data.py)."""


_DEMO_MODEL = dict(model_name="tiny", tiny_layers=1, tiny_hidden=128, max_length=48, batch_size=32,
                   gradient_accumulation_steps=1, head_bias_prior=True, compile_model=False)

PRESETS: dict[str, dict] = {
    "full": {},
    # A randomly initialised encoder needs a far larger learning rate than fine-tuning does, and a plateau before
    # it learns; with a zero head bias it never leaves the label-prior baseline within the budget, hence
    # head_bias_prior (measurements: PLAN.md, "Offline tiny preset").
    "tiny": dict(
        model_name="tiny", tiny_layers=2, tiny_hidden=128, max_length=64, max_steps=500, eval_steps=100,
        learning_rate=1e-3, warmup_ratio=0.1, head_bias_prior=True,
    ),
    # make demo: the same model, cache and batches in both phases; the second starts from the first's best weights.
    "demo_pretrain": dict(_DEMO_MODEL, max_steps=1200, eval_steps=300, learning_rate=1e-3, diagnostics_every=0),
    "demo": dict(_DEMO_MODEL, max_steps=600, eval_steps=200, learning_rate=2e-4, diagnostics_every=25),
    # roberta-base: 12 layers, hidden 768, 12 heads, intermediate 3,072, 514 positions; vocabulary 50,265 from
    # the cache's words:50265 tokenizer. The rest is the full preset (batch 8 x 4, seq 512, lr 2e-5).
    "synthetic_full": dict(model_name="tiny", tiny_layers=12, tiny_hidden=768, max_length=512),
    "synthetic_full_eurlex_lengths": dict(model_name="tiny", tiny_layers=12, tiny_hidden=768, max_length=512),
}
