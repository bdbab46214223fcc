"""AdamW optimizer states of every supported library read in torch.optim.AdamW's fp32 convention.

torch.optim.AdamW, torchao's low-bit AdamW and torch-optimi keep `exp_avg` / `exp_avg_sq` (torch-optimi
bias-corrected, with per-group step counts); bitsandbytes keeps `state1` / `state2`, fp32 or 8-bit block-wise
codes. These functions return the moments and step count an fp32 AdamW step needs
(`optimizers.adamw_fp32_step`), and the values the stored moments would take if their recurrence ran in fp32:
the references the diagnostics compare the optimizer's real update and moment writes against.
"""
from __future__ import annotations

import torch

BNB_BLOCK_SIZE = 256  # bitsandbytes' 8-bit optimizers quantize their states in blocks of 256


def _dequantize(state: dict, which: int, like: torch.Tensor) -> torch.Tensor:
    """bitsandbytes state{1,2}: fp32 as is, or 8-bit block-wise codes with their absmax and code map."""
    codes = state[f"state{which}"]
    if codes.dtype != torch.uint8:
        return codes.float()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_blockwise(codes, absmax=state[f"absmax{which}"], code=state[f"qmap{which}"],
                                     blocksize=BNB_BLOCK_SIZE).float().view_as(like)


def betas(hyper: dict) -> tuple[float, float]:
    """(beta1, beta2) of an optimizer parameter group, whichever way the library names them."""
    return tuple(hyper["betas"]) if "betas" in hyper else (hyper["beta1"], hyper["beta2"])  # torch-optimi: beta1/2


def _debiased(state: dict, hyper: dict) -> bool:
    """torch-optimi stores bias-corrected moments (m_t / (1 - beta1^t), likewise v) and counts steps per group."""
    return "step" not in state and "beta1" in hyper


def steps_taken(state: dict, hyper: dict) -> float:
    if _debiased(state, hyper):
        return float(hyper.get("step", 0))
    return float(state["step"]) if state else 0.0


def stored_moments(state: dict) -> dict[str, torch.Tensor]:
    """The stored first and second moment tensors of an AdamW state, by role (bitsandbytes: state1, state2)."""
    out = {}
    for role, keys in (("exp_avg", ("exp_avg", "state1")), ("exp_avg_sq", ("exp_avg_sq", "state2"))):
        value = next((state[k] for k in keys if torch.is_tensor(state.get(k))), None)
        if value is not None:
            out[role] = value
    return out


def stored_moments_fp32(state: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored moments by role as fp32 values in the optimizer's own convention (torch-optimi's stay
    bias-corrected): floating-point states as they are, bitsandbytes' 8-bit codes dequantized (`like`: the
    parameter, for their shape)."""
    return {role: _dequantize(state, 1 if role == "exp_avg" else 2, like) if "state1" in state else value.float()
            for role, value in stored_moments(state).items()}


def moments_fp32(state: dict, param: torch.Tensor, hyper: dict) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(first moment, second moment, steps taken) of an AdamW state in fp32, in torch.optim.AdamW's convention
    (no bias correction in the stored values); zeros before the first step; None for a state layout this module
    does not know (that parameter is then left out of the fidelity)."""
    steps = steps_taken(state, hyper)
    if not state:
        zeros = torch.zeros_like(param, dtype=torch.float32)
        return zeros, zeros, 0.0
    if "exp_avg" not in state and "state1" not in state:
        return None
    # torch.optim.AdamW, torchao, torch-optimi (quantized states dequantize on .float()), bitsandbytes
    moments = stored_moments_fp32(state, param)
    first, second = moments["exp_avg"], moments["exp_avg_sq"]
    if _debiased(state, hyper):
        beta1, beta2 = betas(hyper)
        first, second = first * (1 - beta1**steps), second * (1 - beta2**steps)
    return first, second, steps


def next_moments_fp32(state: dict, grad: torch.Tensor, hyper: dict) -> dict[str, torch.Tensor]:
    """The values the stored moments would take after this step if the recurrence ran in fp32 from the stored
    values (in the optimizer's own convention; 8-bit codes dequantized)."""
    beta1, beta2 = betas(hyper)
    if _debiased(state, hyper):  # torch-optimi's bias-corrected betas for the step about to be taken
        t = steps_taken(state, hyper) + 1
        beta1, beta2 = ((b**t - b) / (b**t - 1) for b in (beta1, beta2))
    grad = grad.float()
    targets = {"exp_avg": (grad, beta1), "exp_avg_sq": (grad.square(), beta2)}
    return {role: value.lerp(targets[role][0], 1 - targets[role][1])
            for role, value in stored_moments_fp32(state, grad).items()}


def second_moment(state: dict) -> torch.Tensor | None:
    """The stored second moment if it is floating point (8-bit codes have no subnormals to count)."""
    value = stored_moments(state).get("exp_avg_sq")
    return value if value is not None and value.is_floating_point() else None
