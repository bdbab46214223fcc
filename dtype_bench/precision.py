"""The precision registry and how a config is applied: the one place where dtype decisions live.

A `PrecisionConfig` is data (frozen). Everything dtype-dependent in a training script is derived from it
here: the matmul precision flags, the model's parameter dtypes, the autocast context (and the output layer's),
the loss dtype, the GradScaler, the precision evaluation runs under, whether to compile, whether this hardware
can run it at all, and the check of all of it that runs after the first optimizer step and at evaluation. The
optimizer a config names is built in `optimizers.py`. Experiments call these functions; they never branch on a
config name.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Literal

import torch

OptimizerKind = Literal["adamw", "adamw_8bit", "adamw_stochastic_rounding", "adamw_fp32_states", "adamw_kahan"]
LossScaling = Literal["none", "dynamic"]
WeightUpdateRounding = Literal["nearest", "stochastic", "kahan"]
EvalPrecision = Literal["config", "fp32"]

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65,504: logits above this overflow in fp16
EIGHT_BIT = torch.uint8  # moment dtype of block-wise 8-bit optimizer states (codes + per-block scales)

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
    loss_dtype: torch.dtype = torch.float32
    """dtype the loss is computed in (logits and targets are cast to it first). fp32 everywhere: the plan's
    numerical-stability rule (a softmax over 50k logits or a mean of 4,271 BCE terms loses digits in 16 bits)."""
    weight_update_rounding: WeightUpdateRounding = "nearest"
    """How the new weight is written into a low-precision (fp16/bf16) weight: 'nearest' (round to nearest
    even: an update below half an ulp of the weight is lost), 'stochastic' (rounded up or down with
    probabilities that make the stored weight unbiased), 'kahan' (round to nearest plus a per-weight
    compensation buffer that carries the rounding error into the next step). fp32 weights are always
    rounded to nearest in fp32."""
    exp_avg_dtype: torch.dtype = torch.float32
    """dtype AdamW's first moment is stored in; torch.uint8 = block-wise 8-bit codes (bitsandbytes, which
    keeps fp32 moments for tensors under 4,096 elements)."""
    exp_avg_sq_dtype: torch.dtype = torch.float32
    """dtype AdamW's second moment is stored in (torch.uint8 as for exp_avg). A bf16 second moment rounded
    to nearest cannot decay: with beta2 = 0.999 one step changes it by at most 0.1%, below bf16's half-ulp
    (2^-9 = 0.2%)."""
    optimizer: OptimizerKind = "adamw"
    """The implementation, which must be able to do what the fields above say (checked in __post_init__):
    'adamw': torch AdamW, moments in the parameter dtype; 'adamw_8bit': bitsandbytes 8-bit block-wise
    AdamW; 'adamw_stochastic_rounding': torchao `_AdamW(bf16_stochastic_round=True)` (moments in the
    parameter dtype, i.e. bf16 rounded to nearest); 'adamw_fp32_states': `AdamWFp32States`, fp32 moments
    and arithmetic, the new weight rounded to nearest or stochastically; 'adamw_kahan': torch-optimi AdamW
    with `kahan_sum=True` (moments in the parameter dtype)."""
    adam_eps: float | None = None
    """Override of the run's AdamW epsilon (e.g. an eps that does not round to 0 in fp16); None = the run's."""
    tf32: bool = False
    """Allow TF32 tensor-core matmuls/convolutions for fp32 tensors (CUDA compute capability >= 8.0 only)."""
    compile: bool | None = None
    """torch.compile the model, and run the optimizer's own compiled step compiled (torchao's): True/False,
    or None = the device default (`compile_default`). False compiles nothing."""
    fp8: bool = False
    """torchao float8 training on the encoder's Linear layers (needs CUDA compute capability >= 8.9)."""

    def __post_init__(self) -> None:
        floats = (torch.float32, torch.float16, torch.bfloat16)
        if self.weight_dtype not in floats or (self.head_weight_dtype not in (None, *floats)):
            raise ValueError(f"{self.name}: weight dtypes must be float32, float16 or bfloat16")
        if self.loss_dtype not in floats:
            raise ValueError(f"{self.name}: loss_dtype must be float32, float16 or bfloat16")
        if self.adam_eps is not None and not self.adam_eps > 0:
            raise ValueError(f"{self.name}: adam_eps must be positive (or None for the run's), got {self.adam_eps}")
        if self.autocast_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"{self.name}: autocast_dtype must be None, float16 or bfloat16")
        if self.loss_scaling == "dynamic" and self.weight_dtype != torch.float32:
            raise ValueError(f"{self.name}: GradScaler needs fp32 master weights (it refuses to unscale fp16 grads)")
        problem = self._optimizer_cannot()
        if problem:
            raise ValueError(f"{self.name}: optimizer {self.optimizer!r} {problem}")

    def _optimizer_cannot(self) -> str | None:
        """What the named optimizer implementation cannot do of what the numerics fields say, or None."""
        moments = (self.exp_avg_dtype, self.exp_avg_sq_dtype)
        same_as_weights = moments == (self.weight_dtype,) * 2 and self.head_dtype == self.weight_dtype
        rounding = self.weight_update_rounding
        if self.optimizer == "adamw_8bit":
            return None if moments == (EIGHT_BIT,) * 2 and rounding == "nearest" else \
                "keeps 8-bit moments (torch.uint8) and rounds weights to nearest"
        if self.optimizer == "adamw_fp32_states":
            if moments != (torch.float32,) * 2:
                return "keeps fp32 moments"
            if rounding == "kahan" or (rounding == "stochastic" and self.weight_dtype != torch.bfloat16):
                return "rounds to nearest, or stochastically into bf16 weights"
            return None
        if not same_as_weights:
            return "keeps its moments in the parameters' (single) dtype"
        if self.optimizer == "adamw_stochastic_rounding":
            return None if rounding == "stochastic" and self.weight_dtype == torch.bfloat16 else \
                "rounds bf16 weights stochastically (bf16 weights only)"
        if self.optimizer == "adamw_kahan":
            return None if rounding == "kahan" and self.weight_dtype != torch.float32 else \
                "does Kahan-compensated updates of fp16/bf16 weights"
        return None if rounding == "nearest" else "rounds to nearest"

    @property
    def head_dtype(self) -> torch.dtype:
        return self.head_weight_dtype or self.weight_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype most matmuls run in (what the MFU peak is calibrated for; float8 matmuls of `fp8`
        configs are counted against it: their MFU is bf16-equivalent)."""
        return self.autocast_dtype or self.weight_dtype

    def to_record(self) -> dict:
        """JSON-ready fields (dtypes by name) for results rows."""
        return {k: dtype_name(v) if isinstance(v, torch.dtype) else v for k, v in asdict(self).items()}


def _amp(name: str, dtype: torch.dtype, description: str, **kw) -> PrecisionConfig:
    kw.setdefault("loss_scaling", "dynamic" if dtype == torch.float16 else "none")
    return PrecisionConfig(name=name, description=description, autocast_dtype=dtype, **kw)


def _low(dtype: torch.dtype, **kw) -> dict:
    """Pure low-precision weights: weights, gradients and (unless overridden) both moments in `dtype`."""
    return dict(weight_dtype=dtype, exp_avg_dtype=dtype, exp_avg_sq_dtype=dtype) | kw


_FP32_MOMENTS = dict(exp_avg_dtype=torch.float32, exp_avg_sq_dtype=torch.float32)
# bf16 weights written with stochastic rounding, fp32 moments that decay as fp32 AdamW's do
_BF16_SR_FP32_MOMENTS = _low(torch.bfloat16, weight_update_rounding="stochastic", optimizer="adamw_fp32_states",
                             **_FP32_MOMENTS)
_EIGHT_BIT_MOMENTS = dict(exp_avg_dtype=EIGHT_BIT, exp_avg_sq_dtype=EIGHT_BIT, optimizer="adamw_8bit")

REGISTRY: dict[str, PrecisionConfig] = {pc.name: pc for pc in (
    PrecisionConfig("fp32_baseline", "fp32 weights and math, TF32 off"),
    PrecisionConfig("fp32_tf32_matmul", "fp32 weights, TF32 tensor-core matmuls", tf32=True),
    _amp("amp_fp16", torch.float16, "fp32 master weights, fp16 autocast, dynamic loss scaling"),
    _amp("amp_fp16_no_loss_scaling", torch.float16, "amp_fp16 without loss scaling: the control that shows "
         "what loss scaling buys (fp16 activation gradients underflow)", loss_scaling="none"),
    _amp("amp_bf16", torch.bfloat16, "fp32 master weights, bf16 autocast, no loss scaling"),
    PrecisionConfig("fp16_naive", "fp16 weights, grads and AdamW states, no loss scaling", **_low(torch.float16)),
    PrecisionConfig("fp16_naive_safe_eps", "fp16_naive with AdamW eps 1e-4 (representable in fp16): "
                    "isolates the optimizer's 0/0 from gradient underflow/overflow",
                    adam_eps=1e-4, **_low(torch.float16)),
    PrecisionConfig("fp16_fp32_adam_states", "fp16 weights and grads, AdamW moments and arithmetic in fp32 "
                    "(same eps): isolates the optimizer's fp16 arithmetic from fp16 gradients",
                    **_low(torch.float16, optimizer="adamw_fp32_states", **_FP32_MOMENTS)),
    PrecisionConfig("bf16_naive", "bf16 weights, grads and AdamW states, round-to-nearest updates",
                    **_low(torch.bfloat16)),
    PrecisionConfig("bf16_sr_fp32_moments", "bf16 weights/activations/grads, weights written with stochastic "
                    "rounding, fp32 AdamW moments (they decay), compiled", compile=True, **_BF16_SR_FP32_MOMENTS),
    PrecisionConfig("bf16_no_compile", "bf16_sr_fp32_moments with nothing compiled (compile ablation)",
                    compile=False, **_BF16_SR_FP32_MOMENTS),
    PrecisionConfig("bf16_sr_bf16_moments", "bf16 weights with stochastic rounding, bf16 round-to-nearest AdamW "
                    "moments (torchao _AdamW): the second moment cannot decay",
                    **_low(torch.bfloat16, weight_update_rounding="stochastic", optimizer="adamw_stochastic_rounding")),
    PrecisionConfig("bf16_kahan_bf16_moments", "bf16 weights with Kahan-compensated updates, bf16 round-to-nearest "
                    "AdamW moments (torch-optimi); its decoupled weight decay is a separate round-to-nearest "
                    "multiply, lost below bf16's half-ulp",
                    **_low(torch.bfloat16, weight_update_rounding="kahan", optimizer="adamw_kahan")),
    _amp("amp_fp16_8bit_adam", torch.float16, "amp_fp16 with 8-bit AdamW states", **_EIGHT_BIT_MOMENTS),
    _amp("amp_bf16_8bit_adam", torch.bfloat16, "amp_bf16 with 8-bit AdamW states", **_EIGHT_BIT_MOMENTS),
    _amp("amp_bf16_fp32_head", torch.bfloat16, "amp_bf16, output layer in fp32 outside autocast",
         head_compute_fp32=True),
    PrecisionConfig("bf16_body_fp32_head", "bf16_sr_fp32_moments body, fp32 output-layer weights and matmul",
                    head_weight_dtype=torch.float32, head_compute_fp32=True, compile=True, **_BF16_SR_FP32_MOMENTS),
    _amp("amp_bf16_fp8", torch.bfloat16, "amp_bf16 with float8 encoder Linear layers (Hopper)", fp8=True),
)}

GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(REGISTRY),
    "core": ("fp32_baseline", "amp_fp16", "amp_bf16", "bf16_sr_fp32_moments"),
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
    return missing_package_reason(pc)


# The optional packages a config's features need: feature -> (module to import, pip distribution, its extra).
OPTIONAL_PACKAGES: dict[str, tuple[str, str, str | None]] = {
    "adamw_8bit": ("bitsandbytes", "bitsandbytes", "optimizers"),
    "adamw_stochastic_rounding": ("torchao.optim", "torchao", "optimizers"),
    "adamw_kahan": ("optimi", "torch-optimi", "optimizers"),
    "fp8": ("torchao.float8", "torchao", "optimizers"),
}


def optional_packages(pc: PrecisionConfig) -> list[tuple[str, str, str | None]]:
    """(module, pip distribution, extra) of each optional package the config needs."""
    features = [pc.optimizer] + (["fp8"] if pc.fp8 else [])
    return [OPTIONAL_PACKAGES[f] for f in features if f in OPTIONAL_PACKAGES]


def missing_package_reason(pc: PrecisionConfig) -> str | None:
    """Why the config cannot run here for want of an optional package (a `skipped` row naming the install
    command, not a `failed` one with a traceback), or None."""
    for module, dist, extra in optional_packages(pc):
        try:
            importlib.import_module(module)
        except ImportError as e:
            hint = f"pip install 'dtype-bench[{extra}]' (or pip install {dist})" if extra else f"pip install {dist}"
            return f"{pc.name} needs {dist}, which is not importable here ({type(e).__name__}: {e}); install it: {hint}"
    return None


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
    torch.set_float32_matmul_precision("high" if pc.tf32 else "highest")  # cuBLAS and oneDNN (CPU) matmuls


def autocast(pc: PrecisionConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if pc.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=pc.autocast_dtype)


def head_autocast(pc: PrecisionConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """What the model enters around its output layer, as a factory the model calls in its forward (so that
    torch.compile traces the switch): autocast disabled when the head computes in fp32, else nothing. The
    model receives only this, never the config."""
    if pc.head_compute_fp32 and pc.autocast_dtype is not None:
        return functools.partial(torch.autocast, device.type, enabled=False)
    return contextlib.nullcontext


def eval_precision(pc: PrecisionConfig, mode: EvalPrecision) -> PrecisionConfig:
    """The precision evaluation runs under. 'config': the training config itself. 'fp32': the trained weights
    upcast to fp32, no autocast, fp32 loss. What a switch per evaluation cannot change stays as trained, and
    the returned config says so: the TF32 flags (process-wide, set once per run by `apply_matmul_precision`)
    and fp8 (the conversion to float8 Linear layers is structural: they still run float8 matmuls)."""
    if mode == "config":
        return pc
    if mode == "fp32":
        return PrecisionConfig(f"{pc.name}@fp32", f"{pc.name}'s weights evaluated in fp32", tf32=pc.tf32,
                               fp8=pc.fp8)
    raise ValueError(f"evaluation precision must be 'config' or 'fp32', got {mode!r}")


def model_for_eval(model: torch.nn.Module, trained: PrecisionConfig, evaluated: PrecisionConfig) -> torch.nn.Module:
    """The model to evaluate under `evaluated`: the model itself when its parameters already have the evaluation's
    dtypes, else an upcast copy (the trained low-precision weights stay as they are for the next step)."""
    if (evaluated.weight_dtype, evaluated.head_dtype) == (trained.weight_dtype, trained.head_dtype):
        return model
    if evaluated.head_dtype != evaluated.weight_dtype:
        raise ValueError(f"{evaluated.name}: an evaluation precision has one weight dtype")
    return copy.deepcopy(model).to(evaluated.weight_dtype)


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


def weight_update_rounding_of(optimizer: torch.optim.Optimizer) -> WeightUpdateRounding:
    """How this optimizer object writes low-precision weights, read from the object itself (for check_dtypes)."""
    if getattr(optimizer, "bf16_stochastic_round", False):  # torchao
        return "stochastic"
    if any(g.get("kahan_sum") for g in optimizer.param_groups):  # torch-optimi (True once states exist)
        return "kahan"
    return getattr(optimizer, "rounding", "nearest")


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


_BNB_MOMENT_KEYS = {"state1": "exp_avg", "state2": "exp_avg_sq"}


def _moment_problems(pc: PrecisionConfig, state_dtypes: dict[str, list[str]]) -> list[str]:
    """Each moment's allocated dtypes against the config's field. 8-bit: bitsandbytes keeps fp32 moments for
    tensors under 4,096 elements, so fp32 may appear beside uint8, but uint8 must."""
    problems = []
    for key, field_name in (("exp_avg", "exp_avg_dtype"), ("exp_avg_sq", "exp_avg_sq_dtype")):
        expected = dtype_name(getattr(pc, field_name))
        found = sorted({d for k, dtypes in state_dtypes.items() if _BNB_MOMENT_KEYS.get(k, k) == key for d in dtypes})
        allowed = {expected, "float32"} if expected == dtype_name(EIGHT_BIT) else {expected}
        if not found:
            problems.append(f"no {key} state allocated (state keys {sorted(state_dtypes)})")
        elif not set(found) <= allowed or expected not in found:
            problems.append(f"{key} stored as {found}, config says {expected}")
    return problems


def tf32_flags() -> dict[str, bool]:
    """Whether TF32 is allowed, as torch has it set, for the fp32 work `apply_matmul_precision` decides: cuBLAS
    matmuls, cuDNN convolutions and oneDNN (CPU) matmuls. Read per backend from `fp32_precision` ('none' inherits
    the parent's, as torch resolves it), because once a library has mixed the new API with the legacy one (the HF
    Trainer's `tf32` sets `torch.backends.fp32_precision`) the legacy getters (`allow_tf32`,
    `get_float32_matmul_precision`) raise instead of answering."""
    def tf32(*backends) -> bool:
        setting = next((b.fp32_precision for b in backends if b.fp32_precision != "none"), "ieee")
        return setting == "tf32"

    b = torch.backends
    return {"cuda_matmul": tf32(b.cuda.matmul, b), "cudnn_conv": tf32(b.cudnn.conv, b.cudnn, b),
            "mkldnn_matmul": tf32(b.mkldnn.matmul, b.mkldnn, b)}


def _loss_scaling(pc: PrecisionConfig, scaler: torch.amp.GradScaler) -> tuple[dict, list[str]]:
    """Whether the training step's GradScaler is on, and scaled a loss, against the config's loss scaling."""
    # `_scale` is created by the first scale() of an enabled scaler: an enabled one that never scaled leaves it None
    got = {"enabled": scaler.is_enabled(), "scaled": scaler.is_enabled() and scaler._scale is not None}
    wanted = pc.loss_scaling == "dynamic"
    if got["enabled"] != wanted:
        return got, ["GradScaler " + ("used" if got["enabled"] else "not used")]
    if wanted and not got["scaled"]:
        return got, ["GradScaler enabled but it scaled no loss"]
    return got, []


def check_dtypes(
    pc: PrecisionConfig, body: torch.nn.Module, head: torch.nn.Module, logits: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None, *, loss: torch.Tensor | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict:
    """Compare what was actually allocated, computed and set with what the config says; raise on any difference.

    Always: parameter and logit dtypes and the TF32 flags (`tf32_flags`). Given the optimizer: its moment dtypes
    and weight-update rounding (call after the first optimizer step: state is allocated lazily). Given the loss:
    its dtype. Given the GradScaler the step used (a disabled one when none was): whether it is on and scaled
    the loss. Training checks everything after its first step; evaluation checks its first batch against
    `eval_precision(...)` (no optimizer, no scaler). Returns the record stored in the results row.
    """
    got = {
        "body_params": _dtypes(body.parameters()),
        "head_params": _dtypes(head.parameters()),
        "logits": dtype_name(logits.dtype),
    }
    expected_logits = (
        torch.float32 if pc.head_compute_fp32 else pc.autocast_dtype or pc.head_dtype
    )
    problems = []
    if got["body_params"] != [dtype_name(pc.weight_dtype)]:
        problems.append(f"body params {got['body_params']} != {dtype_name(pc.weight_dtype)}")
    if got["head_params"] != [dtype_name(pc.head_dtype)]:
        problems.append(f"head params {got['head_params']} != {dtype_name(pc.head_dtype)}")
    if logits.dtype != expected_logits:
        problems.append(f"logits {got['logits']} != {dtype_name(expected_logits)}")
    if loss is not None:
        got["loss"] = dtype_name(loss.dtype)
        if loss.dtype != pc.loss_dtype:
            problems.append(f"loss {got['loss']} != {dtype_name(pc.loss_dtype)}")
    if optimizer is not None:
        got["optimizer_state"] = optimizer_state_dtypes(optimizer)
        problems += _moment_problems(pc, got["optimizer_state"])
        rounding = weight_update_rounding_of(optimizer)
        got["weight_update_rounding"] = rounding
        if rounding != pc.weight_update_rounding:
            problems.append(f"optimizer rounds weight updates {rounding!r}, config says {pc.weight_update_rounding!r}")
        if rounding == "kahan" and got["optimizer_state"].get("kahan_comp") != [dtype_name(pc.weight_dtype)]:
            problems.append(f"Kahan compensation buffers {got['optimizer_state'].get('kahan_comp')} are not "
                            f"{dtype_name(pc.weight_dtype)}")
    if scaler is not None:
        got["loss_scaling"], scaling_problems = _loss_scaling(pc, scaler)
        problems += scaling_problems
    got["tf32"] = tf32_flags()
    problems += [f"TF32 {k} is {on}, config says {pc.tf32}" for k, on in got["tf32"].items() if on != pc.tf32]
    if problems:
        raise PrecisionMismatch(f"{pc.name}: " + "; ".join(problems))
    return got
