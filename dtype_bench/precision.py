"""The precision registry and how a config is applied: the one place where dtype decisions live.

A `PrecisionConfig` is data (frozen). Everything dtype-dependent in a training script is derived from it
here: the matmul precision flags, the model's parameter dtypes, the autocast context, the GradScaler, the
optimizer (and its state dtype), whether to compile, whether this hardware can run it at all, and the
dtype check that runs after the model is built. Experiments call these functions; they never branch on a
config name.
"""
from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal

import torch

OptimizerKind = Literal["adamw", "adamw_8bit", "adamw_stochastic_rounding", "adamw_fp32_states"]
LossScaling = Literal["none", "dynamic"]

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65,504: logits above this overflow in fp16

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class PrecisionConfig:
    name: str
    """Registry key, used on the command line and in results rows."""
    description: str
    """One line a reader of the report understands."""
    weight_dtype: torch.dtype = torch.float32
    """dtype of the stored (master) parameters and therefore of their gradients."""
    autocast_dtype: torch.dtype | None = None
    """Compute dtype for autocast-eligible ops (matmuls, attention); None = no autocast."""
    loss_scaling: LossScaling = "none"
    """'dynamic' = torch.amp.GradScaler (skips steps whose gradients overflow, adapts the scale)."""
    head_weight_dtype: torch.dtype | None = None
    """dtype of the output layer's parameters; None = same as weight_dtype."""
    head_compute_fp32: bool = False
    """Run the output layer outside autocast in fp32 (inputs upcast): fp32 logits and fp32 head gradients."""
    optimizer: OptimizerKind = "adamw"
    """'adamw': torch AdamW, states in the parameter dtype; 'adamw_8bit': bitsandbytes 8-bit block-wise
    AdamW states; 'adamw_stochastic_rounding': torchao AdamW writing bf16 weights with stochastic rounding;
    'adamw_fp32_states': `AdamWFp32States`, fp32 moments and arithmetic, the result rounded to nearest into the
    weights' own dtype."""
    adam_eps: float | None = None
    """Override of the run's AdamW epsilon (e.g. an eps that does not round to 0 in fp16); None = the run's."""
    tf32: bool = False
    """Allow TF32 tensor-core matmuls/convolutions for fp32 tensors (CUDA compute capability >= 8.0 only)."""
    compile: bool | None = None
    """torch.compile the model: True/False, or None = the device default (`compile_default`)."""
    fp8: bool = False
    """torchao float8 training on the encoder's Linear layers (needs CUDA compute capability >= 8.9)."""
    family: str = field(default="fp32")
    """Colour family in plots: fp32, fp16 or bf16."""

    def __post_init__(self) -> None:
        floats = (torch.float32, torch.float16, torch.bfloat16)
        if self.weight_dtype not in floats or (self.head_weight_dtype not in (None, *floats)):
            raise ValueError(f"{self.name}: weight dtypes must be float32, float16 or bfloat16")
        if self.autocast_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"{self.name}: autocast_dtype must be None, float16 or bfloat16")
        if self.loss_scaling == "dynamic" and self.weight_dtype != torch.float32:
            raise ValueError(f"{self.name}: GradScaler needs fp32 master weights (it refuses to unscale fp16 grads)")
        if self.optimizer == "adamw_stochastic_rounding" and self.weight_dtype != torch.bfloat16:
            raise ValueError(f"{self.name}: stochastic rounding is implemented for bf16 weights only")
        if self.family not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"{self.name}: family must be fp32, fp16 or bf16")

    @property
    def head_dtype(self) -> torch.dtype:
        return self.head_weight_dtype or self.weight_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype most matmuls run in (what the MFU peak is calibrated for)."""
        return self.autocast_dtype or self.weight_dtype

    def to_record(self) -> dict:
        """JSON-ready fields (dtypes by name) for results rows."""
        return {k: dtype_name(v) if isinstance(v, torch.dtype) else v for k, v in asdict(self).items()}


def _amp(name: str, dtype: torch.dtype, description: str, **kw) -> PrecisionConfig:
    return PrecisionConfig(
        name=name, description=description, autocast_dtype=dtype,
        loss_scaling="dynamic" if dtype == torch.float16 else "none",
        family="fp16" if dtype == torch.float16 else "bf16", **kw,
    )


_BF16_PURE = dict(weight_dtype=torch.bfloat16, optimizer="adamw_stochastic_rounding", family="bf16")

REGISTRY: dict[str, PrecisionConfig] = {pc.name: pc for pc in (
    PrecisionConfig("fp32_baseline", "fp32 weights and math, TF32 off"),
    PrecisionConfig("fp32_tf32_matmul", "fp32 weights, TF32 tensor-core matmuls", tf32=True),
    _amp("amp_fp16", torch.float16, "fp32 master weights, fp16 autocast, dynamic loss scaling"),
    _amp("amp_bf16", torch.bfloat16, "fp32 master weights, bf16 autocast, no loss scaling"),
    PrecisionConfig("fp16_naive", "fp16 weights, grads and AdamW states, no loss scaling",
                    weight_dtype=torch.float16, family="fp16"),
    PrecisionConfig("fp16_naive_safe_eps", "fp16_naive with AdamW eps 1e-4 (representable in fp16): "
                    "isolates the optimizer's 0/0 from gradient underflow/overflow",
                    weight_dtype=torch.float16, adam_eps=1e-4, family="fp16"),
    PrecisionConfig("fp16_fp32_adam_states", "fp16 weights and grads, AdamW moments and arithmetic in fp32 "
                    "(same eps): isolates the optimizer's fp16 arithmetic from fp16 gradients",
                    weight_dtype=torch.float16, optimizer="adamw_fp32_states", family="fp16"),
    PrecisionConfig("bf16_naive", "bf16 weights, grads and AdamW states, round-to-nearest updates",
                    weight_dtype=torch.bfloat16, family="bf16"),
    PrecisionConfig("bf16_pure", "bf16 weights/activations/grads, AdamW with stochastic rounding, compiled",
                    compile=True, **_BF16_PURE),
    PrecisionConfig("bf16_no_compile", "bf16_pure without torch.compile (compile ablation)",
                    compile=False, **_BF16_PURE),
    _amp("amp_fp16_8bit_adam", torch.float16, "amp_fp16 with 8-bit AdamW states", optimizer="adamw_8bit"),
    _amp("amp_bf16_8bit_adam", torch.bfloat16, "amp_bf16 with 8-bit AdamW states", optimizer="adamw_8bit"),
    _amp("amp_bf16_fp32_head", torch.bfloat16, "amp_bf16, output layer in fp32 outside autocast",
         head_compute_fp32=True),
    PrecisionConfig("bf16_body_fp32_head", "bf16_pure body, fp32 output-layer weights and matmul",
                    head_weight_dtype=torch.float32, head_compute_fp32=True, compile=True, **_BF16_PURE),
    _amp("amp_bf16_fp8", torch.bfloat16, "amp_bf16 with float8 encoder Linear layers (Hopper)", fp8=True),
)}

GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(REGISTRY),
    "core": ("fp32_baseline", "amp_fp16", "amp_bf16", "bf16_pure"),
}


class UnknownConfig(ValueError):
    pass


def resolve_names(spec: str) -> list[str]:
    """'all', 'core', one name, or a comma-separated list of names -> registry names."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        names.extend(GROUPS.get(part, (part,)))
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        raise UnknownConfig(
            f"unknown config {', '.join(unknown) or repr(spec)}; valid: {', '.join(GROUPS)}, {', '.join(REGISTRY)}"
        )
    return list(dict.fromkeys(names))


def get(name: str) -> PrecisionConfig:
    names = resolve_names(name)
    if len(names) != 1:
        raise UnknownConfig(f"{name!r} names {len(names)} configs; one was expected")
    return REGISTRY[names[0]]


# ---------------------------------------------------------------- what the hardware can run


def unsupported_reason(pc: PrecisionConfig, device: torch.device) -> str | None:
    """Why this device cannot run the config (recorded as status `skipped`), or None if it can."""
    cuda = device.type == "cuda"
    capability = torch.cuda.get_device_capability(device) if cuda else None
    where = torch.cuda.get_device_name(device) if cuda else device.type
    if pc.tf32 and not (cuda and capability >= (8, 0)):
        return f"TF32 matmuls need a CUDA GPU of compute capability >= 8.0 (Ampere or newer); this run is on {where}"
    if pc.fp8 and not (cuda and capability >= (8, 9)):
        return f"float8 training needs a CUDA GPU of compute capability >= 8.9 (Ada/Hopper); this run is on {where}"
    uses_bf16 = torch.bfloat16 in (pc.weight_dtype, pc.autocast_dtype, pc.head_weight_dtype)
    if uses_bf16 and cuda and not torch.cuda.is_bf16_supported():
        return f"{where} has no bfloat16 support"
    needed = (["torchao.float8"] if pc.fp8 else []) + [OPTIMIZER_PACKAGES.get(pc.optimizer)]
    for module in filter(None, needed):
        try:
            importlib.import_module(module)
        except ImportError as e:  # e.g. an offline node without the optional package: skipped, not failed
            return f"{module} is not importable: {e}"
    return None


OPTIMIZER_PACKAGES = {"adamw_8bit": "bitsandbytes", "adamw_stochastic_rounding": "torchao.optim"}
"""Optimizer kind -> the optional package (module) that implements it (see build_optimizer)."""


def compile_default(device: torch.device) -> bool:
    """Per-device default for configs that leave `compile` open. Measured on a 2-core CPU (tiny RoBERTa,
    fp32): compiled 32 vs eager 44 samples/s plus ~30 s of compilation, so CPU defaults to eager; on CUDA,
    compile fuses the elementwise work around matmuls and is on."""
    return device.type == "cuda"


def should_compile(pc: PrecisionConfig, device: torch.device) -> bool:
    return compile_default(device) if pc.compile is None else pc.compile


# ---------------------------------------------------------------- applying a config


def apply_matmul_precision(pc: PrecisionConfig) -> None:
    """Set TF32 explicitly on every run (never inherit a process-global default)."""
    torch.backends.cuda.matmul.allow_tf32 = pc.tf32
    torch.backends.cudnn.allow_tf32 = pc.tf32
    torch.set_float32_matmul_precision("high" if pc.tf32 else "highest")


def autocast(pc: PrecisionConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if pc.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=pc.autocast_dtype)


def head_autocast_off(pc: PrecisionConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Context for the output layer: autocast disabled when the head computes in fp32."""
    if pc.head_compute_fp32 and pc.autocast_dtype is not None:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def grad_scaler(pc: PrecisionConfig, device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=pc.loss_scaling == "dynamic")


def cast_model(body: torch.nn.Module, head: torch.nn.Module, pc: PrecisionConfig) -> None:
    """Parameter dtypes; with `fp8`, the body's Linear layers become torchao Float8Linear (fp32 master
    weights, float8 matmuls). The head is never converted: its 4,271 outputs are not a multiple of 16."""
    body.to(pc.weight_dtype)
    head.to(pc.head_dtype)
    if pc.fp8:
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(body, module_filter_fn=_float8_compatible)


def _float8_compatible(module: torch.nn.Module, fqn: str) -> bool:
    """float8 matmuls (torch._scaled_mm) need both Linear dimensions divisible by 16."""
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def adamw_fp32_step(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    step: float, *, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step computed entirely in fp32, inputs untouched: (new weight, new exp_avg, new exp_avg_sq).
    `step` counts this step from 1. The formula of torch.optim.AdamW, torchao's AdamW and bitsandbytes'."""
    weight, grad = weight.float(), grad.float()
    exp_avg = exp_avg.float().lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq.float().lerp(grad.square(), 1 - beta2)
    denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step) + eps
    return weight * (1 - lr * weight_decay) - (lr / (1 - beta1**step)) * exp_avg / denom, exp_avg, exp_avg_sq


class AdamWFp32States(torch.optim.Optimizer):
    """AdamW whose moments and arithmetic are fp32 whatever the weights' dtype; the new weight is rounded to
    nearest into that dtype. Over fp16 weights it is fp16_naive's optimizer without fp16 arithmetic: the
    second moment cannot underflow and eps = 1e-8 does not round to 0."""

    def __init__(self, params, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                 exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
                state["step"] += 1
                weight, state["exp_avg"], state["exp_avg_sq"] = adamw_fp32_step(
                    p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr=group["lr"], beta1=beta1,
                    beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
                p.copy_(weight)


def build_optimizer(
    pc: PrecisionConfig, param_groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
    weight_decay: float, device: torch.device,
) -> torch.optim.Optimizer:
    """AdamW in the flavour the config names. Param groups may carry their own weight_decay."""
    eps = pc.adam_eps if pc.adam_eps is not None else eps
    kwargs = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if pc.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    if pc.optimizer == "adamw_stochastic_rounding":
        from torchao.optim import _AdamW

        return _AdamW(param_groups, bf16_stochastic_round=True, **kwargs)
    if pc.optimizer == "adamw_fp32_states":
        return AdamWFp32States(param_groups, **kwargs)
    # Both implementations keep the states in the parameter dtype, but they do not compute alike: the fused
    # kernels (CUDA and CPU) do the update arithmetic in fp32 even for fp16/bf16 parameters, which would
    # quietly turn the naive low-precision configs into mixed-precision optimizers (measured: fp16_naive stops
    # diverging, because eps=1e-8 no longer rounds to 0). So fused only for fp32 weights (same numerics,
    # 12 ms vs 38-52 ms per step for the tiny model on a 2-core CPU), foreach arithmetic in the weight dtype
    # otherwise.
    fused = pc.weight_dtype == torch.float32 and pc.head_dtype == torch.float32 and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups, fused=fused, foreach=None if fused else True, **kwargs)


# ---------------------------------------------------------------- checking what we got


class PrecisionMismatch(AssertionError):
    pass


def _dtypes(tensors: Iterable[torch.Tensor]) -> list[str]:
    return sorted({dtype_name(t.dtype) for t in tensors})


def optimizer_state_dtypes(optimizer: torch.optim.Optimizer) -> dict[str, list[str]]:
    """dtype(s) of each kind of optimizer state tensor actually allocated (e.g. exp_avg, state1)."""
    found: dict[str, set[str]] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                inner = getattr(value, "codes", value)  # torchao 8-bit states keep their codes inside
                found.setdefault(key, set()).add(dtype_name(inner.dtype))
    return {k: sorted(v) for k, v in found.items()}


def check_dtypes(
    pc: PrecisionConfig, body: torch.nn.Module, head: torch.nn.Module, logits: torch.Tensor,
    optimizer: torch.optim.Optimizer,
) -> dict:
    """Compare the dtypes actually allocated with what the config says; raise on any difference.

    Call after the first optimizer step (optimizer state is allocated lazily). Returns the record stored in
    the results row.
    """
    got = {
        "body_params": _dtypes(body.parameters()),
        "head_params": _dtypes(head.parameters()),
        "logits": dtype_name(logits.dtype),
        "optimizer_state": optimizer_state_dtypes(optimizer),
    }
    expected_logits = (
        torch.float32 if pc.head_compute_fp32 else pc.autocast_dtype or pc.head_dtype
    )
    moment_keys = {"exp_avg", "exp_avg_sq", "state1", "state2"}
    state = {k: v for k, v in got["optimizer_state"].items() if k in moment_keys}
    problems = []
    if got["body_params"] != [dtype_name(pc.weight_dtype)]:
        problems.append(f"body params {got['body_params']} != {dtype_name(pc.weight_dtype)}")
    if got["head_params"] != [dtype_name(pc.head_dtype)]:
        problems.append(f"head params {got['head_params']} != {dtype_name(pc.head_dtype)}")
    if logits.dtype != expected_logits:
        problems.append(f"logits {got['logits']} != {dtype_name(expected_logits)}")
    if not state:
        problems.append(f"no AdamW moment state found (keys {sorted(got['optimizer_state'])})")
    elif pc.optimizer == "adamw_8bit":
        if not any("uint8" in v for v in state.values()):
            problems.append(f"8-bit optimizer allocated no uint8 state: {state}")
    else:
        param_dtypes = ({"float32"} if pc.optimizer == "adamw_fp32_states"
                        else {dtype_name(pc.weight_dtype), dtype_name(pc.head_dtype)})
        bad = {k: v for k, v in state.items() if not set(v) <= param_dtypes}
        if bad:
            problems.append(f"optimizer states {bad} not in parameter dtypes {sorted(param_dtypes)}")
    if problems:
        raise PrecisionMismatch(f"{pc.name}: " + "; ".join(problems))
    return got
