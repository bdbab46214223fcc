"""Where a non-finite value first appears, without a host sync per tensor.

Each tensor is reduced to its min and max (`extremes`): one read, exact, and unlike a sum or a norm it cannot
overflow into a false alarm. `count_nonfinite` turns a step's extremes into a device count of tensors holding a
non-finite element. `group_roots` finds, per parameter group, the outermost modules whose outputs end that
group's forward pass: where the diagnostics hook the forward outputs they check.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn

GroupOf = Callable[[str], str]


def extremes(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Min and max of each non-empty tensor, flattened as [min, max, min, max, ...] device scalars. NaN propagates
    into both and an infinity is one of them, so a tensor holds a non-finite element exactly when one of its
    extremes is non-finite; unlike a sum or a norm, a min or max cannot overflow, so large finite values (fp16
    activations near 65504, a finfo.min attention mask) are never mistaken for non-finite ones."""
    return [x for t in tensors if t.numel() for x in torch.aminmax(t.detach())]


def count_nonfinite(found: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """How many tensors among `found = extremes(...)` hold a non-finite element: an fp32 device scalar (no host
    sync; mixed dtypes promote in the stack without changing whether a value is finite)."""
    if not found:
        return torch.zeros((), device=device)
    return (~torch.stack(found).isfinite().view(-1, 2).all(1)).sum(dtype=torch.float32)


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
