"""Underflow counts of a tensor, in its own dtype: exact zeros and subnormals, with structurally zero rows apart.

A row that is entirely zero is structural (an embedding row of a token absent from the batch, a position past
the padded length, a unit nothing reached) and never counted as underflow; a zero inside a row with non-zero
elements flushed to zero; a subnormal is below the smallest normal of the tensor's dtype. `underflow_counts`
stays on the device (no host sync); `underflow_fields` turns summed counts into step-log fractions.
"""
from __future__ import annotations

import torch


def tiny_or_zero(t: torch.Tensor) -> torch.Tensor:
    """Elements that are zero or subnormal in the tensor's own dtype (NaN counts as neither)."""
    return t.abs() < torch.finfo(t.dtype).tiny


def underflow_counts(rows: torch.Tensor) -> torch.Tensor:
    """[elements, elements of structurally zero rows, zeros elsewhere, subnormals] of a 2-D view, as an int64
    device vector (no host sync). A row that is entirely zero is structural: an embedding row of a token absent
    from the batch, a position past the padded length, a unit no sample reached, an activation at a position the
    loss does not depend on. A zero inside a row that has non-zero elements is a value that flushed to zero; a
    subnormal is below the smallest normal of the tensor's own dtype (never in a structural row)."""
    zero = rows == 0
    structural = zero.all(1)
    zeros_elsewhere = (zero & ~structural[:, None]).sum()
    subnormal = (~zero & tiny_or_zero(rows)).sum()
    return torch.stack([torch.tensor(rows.numel(), device=rows.device), structural.sum() * rows.shape[1],
                        zeros_elsewhere, subnormal])


def underflow_fields(prefix: str, counts: dict[str, torch.Tensor]) -> dict:
    """Step-log fields from per-group `underflow_counts` sums: `<prefix>_zero_frac` and `<prefix>_subnormal_frac`
    over the elements of non-structural rows, `<prefix>_underflow_frac` their sum, and
    `<prefix>_structural_zero_frac` over all elements."""
    values = {g: c.tolist() for g, c in counts.items()}
    live = {g: n - structural for g, (n, structural, _, _) in values.items()}
    return {
        f"{prefix}_zero_frac": {g: v[2] / live[g] if live[g] else None for g, v in values.items()},
        f"{prefix}_subnormal_frac": {g: v[3] / live[g] if live[g] else None for g, v in values.items()},
        f"{prefix}_underflow_frac": {g: (v[2] + v[3]) / live[g] if live[g] else None for g, v in values.items()},
        f"{prefix}_structural_zero_frac": {g: v[1] / v[0] if v[0] else None for g, v in values.items()},
    }
