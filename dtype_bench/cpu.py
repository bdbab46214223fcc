"""Training on a CPU someone else is using, or one without native fp16/bf16 matmuls.

- Threads: without `--threads`, a run uses torch's default for this machine (its physical cores, or
  OMP_NUM_THREADS), whatever else is running, so that the same command on the same machine is the same run; a
  sweep decides once and passes `--threads` to every run; the row's `env.torch_threads` records what each ran
  with. When other work keeps cores busy (sampled over half a second before the run starts) the run says so:
  with more torch threads than free cores, OpenMP's waiting threads make step times swing by an order of
  magnitude (experiments/classification/PLAN.md has a measurement), and `--threads N` is the remedy.
- Emulated dtypes: many x86 CPUs have no fp16 (some no bf16) matrix multiply and PyTorch emulates it, 10-20x
  slower than fp32. `matmul_slowdown` measures it (a short fp16/bf16 vs fp32 matmul calibration in this
  process); with `--max_cpu_slowdown X` a config whose compute dtype is more than X times slower is recorded
  as `skipped` with the measured factor, rather than spending half an hour on a number that says nothing
  about a GPU. `python -m dtype_bench.cpu` prints both for this machine. A sweep's runs use the factors its
  own process measured (`inherit_slowdowns`): every run of a sweep makes the same skip/emulate decision, and
  none spends its start recalibrating.
- Emulated matmuls, fast: with `--emulate_slow_matmuls` such a config trains instead, its fp16/bf16 matmuls
  computed as fp32 matmuls of the same values rounded once to the dtype (`EmulatedMatmuls`): the numerics of a
  native GEMM with fp32 accumulation, up to the order of summation, at about fp32 speed. Its quality is the dtype's;
  its speed, memory and op counts are the emulation's, and the analysis compares only its quality.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dtype_bench import precision

CALIBRATION_SIZE = 256  # the tiny preset's matmul widths are 128-256; emulated fp16 at 1024 would take seconds
LOW_PRECISION = (torch.float16, torch.bfloat16)


def busy_cores() -> float:
    """Cores busy with other work, measured over half a second (a load average would still count the
    previous run of a sweep)."""
    import psutil

    return psutil.cpu_percent(interval=0.5) / 100 * (os.cpu_count() or 1)


def pick_threads(requested: int | None, *, cores: int | None = None, busy: float | None = None,
                 default: int | None = None) -> tuple[int, str | None]:
    """(torch threads to use, a warning to print or None). `requested` (--threads) wins and nothing is sampled;
    otherwise torch's thread count (in a fresh process this machine's physical cores, or OMP_NUM_THREADS), never
    fewer because the machine is busy at this moment, with a warning when the cores other work keeps busy
    (`busy`, sampled if not given) leave fewer free than that."""
    if requested:
        return requested, None
    threads = default or torch.get_num_threads()
    cores = cores or os.cpu_count() or 1
    busy = busy_cores() if busy is None else busy
    if threads <= cores - busy + 0.5:
        return threads, None
    return threads, (f"warning: {busy:.1f} of {cores} cores are busy with other work and this run uses {threads} "
                     "torch thread(s): its step times will be slower and may swing up to 20x (more threads than free "
                     "cores); --threads N sets the count")


_SLOWDOWNS: dict[torch.dtype, float] = {}  # measured (or inherited) in this process


def matmul_slowdown(dtype: torch.dtype) -> float:
    """Time of a CPU matmul in `dtype` over the same matmul in fp32 (best of repeated runs, ~0.2 s each), on one
    thread: about 1 where the CPU computes the dtype natively (or faster, e.g. AMX), 10-200 where it is emulated.
    One thread, because on busy cores a multi-threaded fp32 matmul can lose more to waiting threads than
    emulation costs, which would hide the emulation (benchmarks/RESULTS.md, "CPU notes"). Measured once per
    process, or inherited from the sweep that started it (`inherit_slowdowns`)."""
    if dtype not in _SLOWDOWNS:
        from dtype_bench.flops import measure_matmul_peak

        cpu, threads = torch.device("cpu"), torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fp32 = measure_matmul_peak(cpu, torch.float32, size=CALIBRATION_SIZE, seconds=0.2)
            _SLOWDOWNS[dtype] = fp32 / measure_matmul_peak(cpu, dtype, size=CALIBRATION_SIZE, seconds=0.2)
        finally:
            torch.set_num_threads(threads)
    return _SLOWDOWNS[dtype]


def measured_slowdowns() -> dict[torch.dtype, float]:
    """The factors `matmul_slowdown` has measured (or inherited) in this process."""
    return dict(_SLOWDOWNS)


def inherit_slowdowns(slowdowns: dict[torch.dtype, float]) -> None:
    """Take a parent process's measured factors as this process's (a sweep passes them to each run it forks)."""
    _SLOWDOWNS.update(slowdowns)


def too_slow_reason(pc, device: torch.device, max_slowdown: float | None) -> str | None:
    """Why a config is skipped under `--max_cpu_slowdown` (its compute dtype's measured CPU matmul slowdown
    over fp32 exceeds it), or None."""
    if max_slowdown is None or device.type != "cpu" or pc.compute_dtype not in LOW_PRECISION:
        return None
    slowdown = matmul_slowdown(pc.compute_dtype)
    if slowdown <= max_slowdown:
        return None
    name = str(pc.compute_dtype).removeprefix("torch.")
    return (f"{name} matmuls measured {slowdown:.1f}x slower than float32 on this CPU (emulated, not native; "
            f"{CALIBRATION_SIZE}x{CALIBRATION_SIZE} calibration), above --max_cpu_slowdown {max_slowdown:g}; "
            "pass --max_cpu_slowdown none to measure it anyway (the run's matmuls then take up to that factor longer)")


def skip_reason(pc: precision.PrecisionConfig, device: torch.device, max_slowdown: float | None,
                emulate_slow_matmuls: bool = False) -> str | None:
    """Why a config does not train here (the reason of its `skipped` row), or None: the hardware or a missing
    optional package (`precision.unsupported_reason`), or `--max_cpu_slowdown` unless its matmuls are emulated
    instead (`emulates_matmuls`)."""
    unsupported = precision.unsupported_reason(pc, device)
    if unsupported:
        return unsupported
    too_slow = too_slow_reason(pc, device, max_slowdown)  # measured either way: a sweep's runs inherit it
    return None if emulate_slow_matmuls else too_slow


def emulates_matmuls(pc: precision.PrecisionConfig, device: torch.device, max_slowdown: float | None,
                     emulate_slow_matmuls: bool) -> bool:
    """Whether a run computes its fp16/bf16 matmuls with `EmulatedMatmuls`: `--emulate_slow_matmuls`, and its
    compute dtype is one `--max_cpu_slowdown` would skip on this CPU."""
    return emulate_slow_matmuls and too_slow_reason(pc, device, max_slowdown) is not None


class EmulatedMatmuls(TorchDispatchMode):
    """While active (forward, backward, evaluation), every fp16/bf16 mm, addmm, bmm and baddbmm runs as the same
    op on fp32 copies of its inputs (exact: every fp16/bf16 value is an fp32 value, and so is a product of two),
    its result rounded once to the dtype: what a native fp16/bf16 GEMM with fp32 accumulation computes, up to the
    order of summation (tests/test_cpu.py compares it with torch's own kernels: within an output ulp plus that
    order's fp32 rounding error). Every other op runs as it is, in its own dtype."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = args[1].dtype if func in self.OPS else None  # mm, bmm: (self, mat2); the others: (input, mat1, mat2)
        if dtype in LOW_PRECISION:
            return func(*(a.float() if isinstance(a, torch.Tensor) else a for a in args), **kwargs).to(dtype)
        return func(*args, **kwargs)


def matmul_emulation(emulated: bool) -> contextlib.AbstractContextManager:
    """`EmulatedMatmuls` where `emulated` (`emulates_matmuls`), else nothing."""
    return EmulatedMatmuls() if emulated else contextlib.nullcontext()


def _true_or_false(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(value)
    return value.lower() == "true"


def main(argv: list[str] | None = None) -> int:
    """Print this CPU's thread choice and dtype slowdowns, and which configs a run would train (natively or with
    emulated matmuls) or skip."""
    import argparse

    from dtype_bench.configs import HelpFormatter
    from dtype_bench.results import cpu_name

    parser = argparse.ArgumentParser(prog="python -m dtype_bench.cpu", description=main.__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", default="core", help="configs to plan for (as run.py's --config)")
    parser.add_argument("--max_cpu_slowdown", type=lambda s: None if s.lower() == "none" else float(s),
                        help="as run.py's flag (default: none, run all)")
    parser.add_argument("--emulate_slow_matmuls", type=_true_or_false, default=False,
                        help="true or false, as run.py's flag: the configs --max_cpu_slowdown would skip train with "
                             "emulated matmuls")
    args = parser.parse_args(argv)
    threads, busy_warning = pick_threads(None)
    print(f"{cpu_name()}: {os.cpu_count()} cores; torch threads: {threads}")
    if busy_warning:
        print(busy_warning)
    torch.set_num_threads(threads)
    for dtype in LOW_PRECISION:
        print(f"{str(dtype).removeprefix('torch.')} matmul time / float32's: {matmul_slowdown(dtype):.2f}")
    for name in precision.resolve_names(args.config):
        pc = precision.get(name)
        reason = skip_reason(pc, torch.device("cpu"), args.max_cpu_slowdown, args.emulate_slow_matmuls)
        emulated = emulates_matmuls(pc, torch.device("cpu"), args.max_cpu_slowdown, args.emulate_slow_matmuls)
        trains = ("runs, its matmuls emulated in fp32 (quality only: speed and memory not compared)" if emulated
                  else "runs")
        print(f"  {name}: {'skipped: ' + reason if reason else trains}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
