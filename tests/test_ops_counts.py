"""Aten ops the harness dispatches (benchmarks/ops_per_step.py's counter): the pure-bf16 optimizers and the
non-finite tracking stay multi-tensor, counted at roberta-base's 201 parameter tensors (counts, not timings)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.ops_per_step import OpCounter
from dtype_bench import optimizers, precision
from dtype_bench.nonfinite import count_nonfinite

CPU = torch.device("cpu")
SHAPES = [(50, 16), (64, 16), (16,)] + [(16, 16), (16,)] * 98  # 201 tensors, like roberta-base + its head


def optimizer_step_ops(name: str, dtype: torch.dtype) -> int:
    """Ops of the second step (the first allocates the states) of the config's optimizer over SHAPES."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]
    optimizer = optimizers.build_optimizer(precision.REGISTRY[name], [{"params": params}], lr=1e-3,
                                           betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, device=CPU)
    for step in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        if step == 0:
            optimizer.step()
            continue
        with OpCounter() as counter:
            optimizer.step()
    return counter.total


@pytest.mark.parametrize("name", ["bf16_sr_fp32_moments", "bf16_no_compile", "fp16_fp32_adam_states",
                                  "bf16_kahan_bf16_moments"])
def test_pure_low_precision_optimizer_steps_are_within_twice_foreach_adamw(name):
    dtype = precision.REGISTRY[name].weight_dtype
    foreach = optimizer_step_ops("bf16_naive", torch.bfloat16)  # torch AdamW, foreach
    assert foreach > len(SHAPES), "the counter sees the foreach step's per-tensor work"
    assert optimizer_step_ops(name, dtype) <= 2 * foreach


def test_nonfinite_counts_cost_a_few_ops_whatever_the_number_of_tensors():
    tensors = [torch.randn(s) for s in SHAPES] + [torch.randn(4, dtype=torch.bfloat16)]
    tensors[7][0] = float("nan")
    with OpCounter() as counter:
        count = count_nonfinite(tensors, CPU)
    assert count.item() == 1
    assert counter.total <= 10, counter.total  # two multi-tensor ops per dtype, a stack, the count


@pytest.mark.slow
def test_ours_dispatches_at_most_5_percent_more_than_the_trainer_per_training_step(tmp_path):
    """benchmarks/ops_per_step.py end to end at roberta-base's depth: identical optimizer work (both fused AdamW)
    and ours within 1.05x of the Trainer per training step (deterministic counts, any machine)."""
    import json

    from benchmarks import ops_per_step

    rows_file = tmp_path / "rows.jsonl"
    assert ops_per_step.main(["--configs", "fp32_baseline", "--steps", "5", "--output", str(rows_file)]) == 0
    rows = {r["side"]: r for r in map(json.loads, rows_file.read_text().splitlines())}
    ours, trainer = rows["ours"], rows["Trainer"]
    assert ours["status"] == trainer["status"] == "completed"
    assert ours["ops_per_optimizer_step"] == trainer["ops_per_optimizer_step"]
    assert ours["ops_per_step"] <= 1.05 * trainer["ops_per_step"], (ours, trainer)
