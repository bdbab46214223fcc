"""Zero and subnormal counts of a tensor, with structurally zero rows apart.

A row that is entirely zero is structural (an embedding row of a token absent from the batch, a position past
the padded length, a unit nothing reached) and never counted; a zero inside a row with non-zero elements is an
exact zero, which a flush to zero produces but so does exact arithmetic (fp32 has them too): these counts do not
say which, so no field here is called underflow. A subnormal is below the smallest normal of the dtype it is
judged in: the tensor's own, or the dtype of the computation that produced it (an fp32 gradient computed by an
fp16 matmul under autocast is judged against fp16). `underflow_counts` stays on the device (no host sync);
`underflow_fields` turns summed counts into step-log fractions.
"""
from __future__ import annotations

import torch


def tiny_or_zero(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Elements that are zero or subnormal in `dtype` (default: the tensor's own; NaN counts as neither)."""
    return t.abs() < torch.finfo(dtype or t.dtype).tiny


def underflow_counts(rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[elements, elements of structurally zero rows, zeros elsewhere, subnormals] of a 2-D view, as an int64
    device vector (no host sync). A row that is entirely zero is structural: an embedding row of a token absent
    from the batch, a position past the padded length, a unit no sample reached, an activation at a position the
    loss does not depend on. Zeros elsewhere are exact zeros inside rows with non-zero elements; a subnormal is a
    non-zero value below the smallest normal of `dtype` (default: the tensor's own dtype; never in a structural
    row)."""
    zero = rows == 0
    structural = zero.all(1)
    zeros_elsewhere = (zero & ~structural[:, None]).sum()
    subnormal = (~zero & tiny_or_zero(rows, dtype)).sum()
    return torch.stack([torch.tensor(rows.numel(), device=rows.device), structural.sum() * rows.shape[1],
                        zeros_elsewhere, subnormal])


def underflow_fields(prefix: str, counts: dict[str, torch.Tensor]) -> dict:
    """Step-log fields from per-group `underflow_counts` sums, over the elements of non-structural rows:
    `<prefix>_zero_in_live_rows_frac` (exact zeros inside rows with non-zero elements: flushed or exactly zero;
    a row that flushed entirely counts as structural, so as a flush-to-zero figure it is a lower bound),
    and `<prefix>_subnormal_frac`; and `<prefix>_structural_zero_frac` over all elements."""
    values = {g: c.tolist() for g, c in counts.items()}
    live = {g: n - structural for g, (n, structural, _, _) in values.items()}
    return {
        f"{prefix}_zero_in_live_rows_frac": {g: v[2] / live[g] if live[g] else None for g, v in values.items()},
        f"{prefix}_subnormal_frac": {g: v[3] / live[g] if live[g] else None for g, v in values.items()},
        f"{prefix}_structural_zero_frac": {g: v[1] / v[0] if v[0] else None for g, v in values.items()},
    }
