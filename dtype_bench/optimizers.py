"""The optimizers a precision config names, built by `build_optimizer`, and the fp32 AdamW step they are measured by.

`adamw_fp32_step` is the reference: one AdamW step of one tensor in fp32 (torch.optim.AdamW's formula). The
diagnostics compare every optimizer's real update against it; `AdamWFp32States` computes exactly it (bit for bit,
tested), for all the tensors of a parameter group at once with multi-tensor (`torch._foreach_*`) ops, so a step
dispatches a few dozen kernels per group instead of ~20 per parameter tensor.

Optional libraries are imported here only when a config needs them (bitsandbytes, torchao, torch-optimi): a run of
an fp32 or autocast config loads none of them.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch

from dtype_bench.precision import PrecisionConfig, should_compile


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


def stochastic_round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 rounded up or down at random, away from zero with probability (the 16 dropped bits) / 2^16,
    so the expected stored value is x: add 16 uniform random bits below bf16's last bit and truncate. Draws
    from torch's default generator (run.py reseeds it per step, so ranks and resumed runs draw alike)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, device=x.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 = 0xFFFF0000


def _shaped_views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """`flat` cut into consecutive views shaped like the tensors of `like` (one split, then views: no copies)."""
    return [chunk.view(t.shape) for chunk, t in zip(flat.split([t.numel() for t in like]), like)]


class AdamWFp32States(torch.optim.Optimizer):
    """AdamW whose moments and arithmetic are fp32 whatever the weights' dtype (`adamw_fp32_step`, bit for bit);
    the new weight is rounded into the weights' dtype to nearest, or stochastically (`stochastic_round_to_bf16`)
    into bf16 weights (fp32 weights, e.g. an fp32 head, are written exactly).

    A step works per parameter group and weight dtype, on all its tensors at once: the low-precision gradients
    and weights are converted into one flat fp32 buffer (`_foreach_copy_`, which converts dtypes on its fast
    path), the moments and the update are multi-tensor ops on the per-parameter fp32 state, and the new weights
    are rounded on the flat buffer (one random draw for stochastic rounding) and copied back in one op. Transient
    memory during the step: about 12 bytes per parameter (the flat fp32 buffer, the denominator and the scaled
    first moment), like torch's foreach AdamW over fp32 weights.

    Why our own: no maintained library fits. torchao's `_AdamW(bf16_stochastic_round=True)` allocates its moments
    like the parameter (bf16 over bf16 weights, rounded to nearest: the second moment cannot decay), torch-optimi
    keeps moments in the parameter dtype too, and torch's AdamW has no stochastic rounding. Over fp16 weights
    with rounding to nearest it is fp16_naive's optimizer without fp16 arithmetic: the second moment cannot
    underflow and eps = 1e-8 does not round to 0."""

    def __init__(self, params, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 rounding: Literal["nearest", "stochastic"] = "nearest"):
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.rounding = rounding

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim casts every loaded state tensor but `step` to its parameter's dtype, which would round the fp32
        moments of low-precision weights (a resumed run would differ from an uninterrupted one): put them back
        exactly, from the state dict itself (which torch copies before casting)."""
        moments = {i: {k: v for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")}
                   for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for i, p in zip(ids, [p for group in self.param_groups for p in group["params"]]):
            for key, value in moments.get(i, {}).items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                 exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
                state["step"] += 1
                buckets.setdefault((p.device, p.dtype, state["step"]), []).append(p)
            for (_, dtype, step), params in buckets.items():
                self._update(params, dtype, step, group)

    def _update(self, params: list[torch.Tensor], dtype: torch.dtype, step: int, group: dict) -> None:
        """`adamw_fp32_step` for tensors of one device, dtype and step count, in the same operations and order."""
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        grads = [p.grad for p in params]
        low = dtype != torch.float32
        if low:  # fp32 copies of the gradients in one flat buffer, later reused for the new weights
            flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
            scratch = _shaped_views(flat, params)
            torch._foreach_copy_(scratch, grads)
            grads = scratch
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        if low:
            torch._foreach_mul_(grads, grads)  # the fp32 copies become the squares
            squares = grads
        else:
            squares = torch._foreach_mul(grads, grads)
        torch._foreach_lerp_(exp_avg_sqs, squares, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
        torch._foreach_add_(denom, eps)
        scaled = torch._foreach_mul(exp_avgs, lr / (1 - beta1**step))
        torch._foreach_div_(scaled, denom)
        del denom
        weights = params
        if low:  # the weights in fp32, exactly, in the buffer the gradients no longer need
            torch._foreach_copy_(scratch, params)
            weights = scratch
        torch._foreach_mul_(weights, 1 - lr * weight_decay)
        torch._foreach_sub_(weights, scaled)
        if not low:
            return
        if self.rounding == "stochastic" and dtype == torch.bfloat16:
            torch._foreach_copy_(params, _shaped_views(stochastic_round_to_bf16(flat), params))
        else:
            torch._foreach_copy_(params, scratch)  # rounds to nearest into the weights' dtype


def _torchao_adamw(compiled: bool, param_groups: list[dict], **kwargs) -> torch.optim.Optimizer:
    """torchao's `_AdamW` writing bf16 weights with stochastic rounding. It torch.compiles its per-parameter step
    by itself; `compiled=False` runs that step eagerly (a config with compile=False compiles nothing)."""
    from torchao.optim import _AdamW

    class EagerAdamW(_AdamW):
        @torch.no_grad()
        def step(self, closure=None):
            with torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    return (_AdamW if compiled else EagerAdamW)(param_groups, bf16_stochastic_round=True, **kwargs)


def _optimi_kahan_adamw(param_groups: list[dict], device: torch.device, **kwargs) -> torch.optim.Optimizer:
    """torch-optimi's AdamW with Kahan-compensated updates on its multi-tensor paths: its Triton kernels where they
    run (CUDA with Triton), else its foreach implementation (its for-loop path dispatches ~11 ops per tensor)."""
    import optimi
    from optimi.utils import HAS_TRITON

    triton = device.type == "cuda" and HAS_TRITON
    with warnings.catch_warnings():  # foreach=True warns that Triton is the faster path: known, and not available
        warnings.filterwarnings("ignore", message="Parameter `foreach` is deprecated", category=DeprecationWarning)
        return optimi.AdamW(param_groups, kahan_sum=True, foreach=not triton, triton=triton, **kwargs)


def compiles_optimizer_step(pc: PrecisionConfig, device: torch.device) -> bool:
    """Whether the optimizer step runs torch.compile'd code: torchao's AdamW compiles its per-parameter step
    unless the config compiles nothing on this device."""
    return pc.optimizer == "adamw_stochastic_rounding" and should_compile(pc, device)


def adam_eps_of(pc: PrecisionConfig, run_eps: float) -> float:
    """The AdamW epsilon a run uses: the config's override if it has one, else the run's."""
    return run_eps if pc.adam_eps is None else pc.adam_eps


def build_optimizer(
    pc: PrecisionConfig, param_groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
    weight_decay: float, device: torch.device,
) -> torch.optim.Optimizer:
    """AdamW in the flavour the config names. Param groups may carry their own weight_decay."""
    kwargs = dict(lr=lr, betas=betas, eps=adam_eps_of(pc, eps), weight_decay=weight_decay)
    if pc.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    if pc.optimizer == "adamw_stochastic_rounding":
        return _torchao_adamw(compiles_optimizer_step(pc, device), param_groups, **kwargs)
    if pc.optimizer == "adamw_fp32_states":
        return AdamWFp32States(param_groups, rounding=pc.weight_update_rounding, **kwargs)
    if pc.optimizer == "adamw_kahan":
        return _optimi_kahan_adamw(param_groups, device, **kwargs)
    # Both implementations keep the states in the parameter dtype, but they do not compute alike: the fused
    # kernels (CUDA and CPU) do the update arithmetic in fp32 even for fp16/bf16 parameters, which would
    # quietly turn the naive low-precision configs into mixed-precision optimizers (measured: fp16_naive stops
    # diverging, because eps=1e-8 no longer rounds to 0). So fused only for fp32 weights (same numerics,
    # 12 ms vs 38-52 ms per step for the tiny model on a 2-core CPU), foreach arithmetic in the weight dtype
    # otherwise.
    fused = pc.weight_dtype == torch.float32 and pc.head_dtype == torch.float32 and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups, fused=fused, foreach=None if fused else True, **kwargs)
