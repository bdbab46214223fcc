"""Aten ops dispatched per training step and per optimizer step: ours vs the Hugging Face Trainer at identical work.

    python benchmarks/ops_per_step.py                       # roberta-base's depth (12 layers), width 64, CPU
    python benchmarks/ops_per_step.py --configs fp32_baseline,amp_bf16 --tiny_hidden 128

On a GPU a step of roberta-base at batch 8 takes ~25 ms, and every aten op the host dispatches is (about) one
kernel launch: when the harness dispatches more than the model needs, a fast GPU waits for Python and the
precision comparison measures the harness. This counts them, on any device and without timing: a
`TorchDispatchMode` sees every aten op (forward, backward in the autograd engine, optimizer, bookkeeping; views and
allocations included, which launch nothing), counted between the starts of consecutive optimizer steps (the
`StepTimer.start` both sides call, so a count covers one whole step: batch fetch, micro-batches, clipping,
optimizer, monitor) and inside `optimizer.step` (torch's global optimizer step hooks). Steps that log or
evaluate are left out (both sides log once, at the last step); the count is the median over the others.

Ours is experiments/classification/run.py's main in this process; the Trainer is benchmarks/vs_hf_trainer.py's
set-up (same model, micro-batches, optimizer hyper-parameters and precision flags). Configs the Trainer cannot
express are counted for ours only. Eager mode (the CPU default): under torch.compile a graph's ops are fused
kernels this counter does not see, so eager counts are the upper bound of what a step launches.

Writes one JSON row per (config, side) to --output (with `ops_per_step`, `ops_per_optimizer_step`) and prints the
table benchmarks/RESULTS.md shows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/ops_per_step.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import vs_hf_trainer
from dtype_bench import precision, results, runner, throughput
from experiments.classification.config import PRESETS, TrainConfig

DEFAULT_CONFIGS = ("fp32_baseline,amp_bf16,bf16_naive,bf16_sr_fp32_moments,bf16_kahan_bf16_moments,"
                   "bf16_sr_bf16_moments")
STEPS = 8


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (this thread and the autograd engine's, which inherits it)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        return func(*args, **(kwargs or {}))


class StepCounts:
    """Op counts per step (between consecutive `StepTimer.start` calls) and per optimizer step."""

    def __init__(self, counter: OpCounter):
        self.counter, self.step_starts, self.optimizer_steps = counter, [], []
        self._optimizer_start = 0

    def __enter__(self):
        original, counts = throughput.StepTimer.start, self

        def start(timer, timed: bool = True):
            counts.step_starts.append(counts.counter.total)
            return original(timer, timed)

        self._original, throughput.StepTimer.start = original, start
        self._hooks = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        self.counter.__enter__()
        return self

    def __exit__(self, *exc):
        self.counter.__exit__(*exc)
        self.step_starts.append(self.counter.total)
        throughput.StepTimer.start = self._original
        for hook in self._hooks:
            hook.remove()

    def _pre(self, optimizer, args, kwargs):
        self._optimizer_start = self.counter.total

    def _post(self, optimizer, args, kwargs):
        self.optimizer_steps.append(self.counter.total - self._optimizer_start)

    def summary(self) -> dict:
        """Medians over steps 2 .. last-1 (the first allocates optimizer state, the last logs and evaluates)."""
        per_step = [b - a for a, b in zip(self.step_starts, self.step_starts[1:])][1:-1]
        per_optimizer = self.optimizer_steps[1:-1]
        return {"ops_per_step": statistics.median(per_step) if per_step else None,
                "ops_per_optimizer_step": statistics.median(per_optimizer) if per_optimizer else None,
                "steps_counted": len(per_step)}


def count_ours(flags: list[str], config: str) -> dict:
    from experiments.classification import run as classification_run

    with tempfile.TemporaryDirectory() as output_dir, StepCounts(OpCounter()) as counts:
        code = classification_run.main([*flags, "--config", config, "--seed", "0", "--output_dir", output_dir])
    if code != 0:
        return {"status": "failed", "error": f"run.py exited {code}"}
    return {"status": "completed", **counts.summary()}


def count_trainer(flags: list[str], config: str) -> dict:
    _, cfg = runner.parse_args(None, TrainConfig, PRESETS, [*flags, "--config", config])
    pc, device = precision.get(config), runner.pick_device(cfg.device)
    expressible = vs_hf_trainer.trainer_precision_args(pc, device)
    if isinstance(expressible, str):
        return {"status": "not expressible", "reason": expressible}
    with StepCounts(OpCounter()) as counts:
        row = vs_hf_trainer.run_trainer(cfg, pc, 0, device)
    return {"status": row["status"], **({"reason": row["reason"]} if row.get("reason") else {}), **counts.summary()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated precision configs")
    parser.add_argument("--tiny_layers", type=int, default=12, help="encoder layers (roberta-base: 12)")
    parser.add_argument("--tiny_hidden", type=int, default=64, help="hidden width (roberta-base: 768)")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run")
    parser.add_argument("--output", type=Path, help="JSONL rows (default: print only)")
    args, extra = parser.parse_known_args(argv)
    flags = [*vs_hf_trainer.measured_run_flags("tiny", args.steps, 1, None, extra),
             "--tiny_layers", str(args.tiny_layers), "--tiny_hidden", str(args.tiny_hidden), "--max_length", "32",
             "--batch_size", "4", "--gradient_accumulation_steps", "2", "--max_cpu_slowdown", "none",
             "--threads", "1"]
    _, cfg = runner.parse_args(None, TrainConfig, PRESETS, [*flags, "--config", "fp32_baseline"])
    from experiments.classification.prepare_data import prepare_preset

    prepare_preset("tiny", cfg.cache_dir)
    rows = []
    for config in precision.resolve_names(args.configs):
        for side, count in (("ours", count_ours), ("Trainer", count_trainer)):
            row = {"config": config, "side": side, "tiny_layers": args.tiny_layers, "tiny_hidden": args.tiny_hidden,
                   "device": results.cpu_name() if cfg.device != "cuda" else torch.cuda.get_device_name(),
                   **count(flags, config)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.output:
                with args.output.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print(f"\naten ops per optimizer step (training step: batch fetch, forward, backward, clipping, optimizer, "
          f"bookkeeping), {args.tiny_layers} layers x width {args.tiny_hidden}, 2 micro-batches of 4 x 32 tokens, "
          "eager, median over steps 2..last-1")
    print("| config | ours per training step | Trainer per training step | ours / Trainer | ours per optimizer step "
          "| Trainer per optimizer step |\n|---|---|---|---|---|---|")
    by = {(r["config"], r["side"]): r for r in rows}
    for config in dict.fromkeys(r["config"] for r in rows):
        ours, theirs = by[(config, "ours")], by[(config, "Trainer")]
        identical = theirs.get("status") == "completed"  # the Trainer ran the config (its precision check)
        ratio = (f"{ours['ops_per_step'] / theirs['ops_per_step']:.3f}"
                 if identical and ours.get("ops_per_step") and theirs.get("ops_per_step") else "-")
        show = lambda r, k: (f"{r[k]:.0f}" + ("" if r.get("status") == "completed" else f" ({r['status']})")  # noqa: E731
                             if r.get(k) is not None else r.get("status", "-"))
        print(f"| {config} | {show(ours, 'ops_per_step')} | {show(theirs, 'ops_per_step')} | {ratio} | "
              f"{show(ours, 'ops_per_optimizer_step')} | {show(theirs, 'ops_per_optimizer_step')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
