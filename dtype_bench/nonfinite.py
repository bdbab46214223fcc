"""Where a non-finite value first appears, in a few multi-tensor ops per step and no host sync.

`count_nonfinite` reduces forward outputs to a device count of the tensors holding a non-finite element: each
tensor is multiplied by 0 (finite -> 0, inf or NaN -> NaN) and summed (`_foreach_norm(..., 1)`), a NaN sum marking
the tensor. Unlike a sum or norm of the values themselves this cannot overflow, so large finite values (fp16
activations near 65504, a finfo.min attention mask) are never mistaken for non-finite ones; and unlike a maximum
it does not depend on how a kernel treats NaN (a sum always propagates it). It allocates a zeroed copy of the
outputs, which are small beside the model.
`count_nonfinite_state` does the same for gradients and weights without that copy (it would be a transient the
size of a parameter group, on every step, inflating the peak memory the harness measures): their L1 norm
accumulated and returned in fp32 is finite exactly when every element is, unless the finite magnitudes of one
tensor add up past fp32's maximum (3.4e38), which no trained weight or gradient approaches.
Both cost one or two multi-tensor ops per dtype, then a stack, a non-finite test and a count, whatever the number
of tensors.
`group_roots` finds, per parameter group, the outermost modules whose outputs end that group's forward pass: where
the diagnostics hook the forward outputs they check.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn

GroupOf = Callable[[str], str]


def _by_dtype(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Non-empty tensors grouped by dtype (a multi-tensor kernel takes one dtype per launch)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


@torch.no_grad()
def count_nonfinite(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """How many of `tensors` (forward outputs) hold a non-finite element: an fp32 device scalar (no host sync)."""
    groups = _by_dtype(tensors)
    if not groups:
        return torch.zeros((), device=device)
    sums = [s for group in groups for s in torch._foreach_norm(torch._foreach_mul(group, 0.0), 1)]
    return torch.stack(sums).isnan().sum(dtype=torch.float32)  # each sum is 0 or NaN: never inf


@torch.no_grad()
def count_nonfinite_state(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """How many of `tensors` (gradients, weights) hold a non-finite element, without copying them: an fp32 device
    scalar (no host sync)."""
    groups = _by_dtype(tensors)
    if not groups:
        return torch.zeros((), device=device)
    norms = [n for group in groups for n in torch._foreach_norm(group, 1, dtype=torch.float32)]
    return (~torch.stack(norms).isfinite()).sum(dtype=torch.float32)


def output_tensors(output) -> Iterator[torch.Tensor]:
    """Floating tensors in a module output (tensor, tuple/list, dict or HF ModelOutput)."""
    if torch.is_tensor(output):
        if output.is_floating_point():
            yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from output_tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from output_tensors(item)


def group_roots(model: nn.Module, group_of: GroupOf) -> list[tuple[str, nn.Module]]:
    """The outermost called modules whose parameters all belong to one group, in definition order, as
    (group, module). Their outputs are where a group's forward pass ends. Containers that are never called
    (ModuleList/ModuleDict, e.g. a stack of transformer blocks) contribute their children instead."""
    roots: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        groups = {group_of(f"{prefix}{n}") for n, _ in module.named_parameters(remove_duplicate=False)}
        if len(groups) == 1 and prefix and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            roots.append((groups.pop(), module))
            return
        for name, child in module.named_children():
            visit(f"{prefix}{name}.", child)

    visit("", model)
    return roots
