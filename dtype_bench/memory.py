"""Memory: the peak of training and of evaluation measured apart (`PeakMemory`), and the bytes a tensor really
holds (`tensor_bytes`: 8-bit and quantized optimizer states at their stored size) for static-memory accounting.

`PeakMemory`, CUDA: the allocator's peak statistics are reset when a phase begins and read when it ends (max
allocated and max reserved, separately). CPU: the process's resident-set high-water mark (VmHWM), reset per
phase through /proc/self/clear_refs where Linux allows it; elsewhere it is the whole-process peak since start,
and `peak_memory_kind` says which.
"""
from __future__ import annotations

import contextlib
import math
import re
import resource
import sys
from pathlib import Path
from typing import Iterator

import torch

from dtype_bench.adamw_state import BNB_BLOCK_SIZE
from dtype_bench.precision import PrecisionConfig
from dtype_bench.results import ResultRow, row_fields

GIB = 2**30


def _cpu_peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (VmHWM on Linux; ru_maxrss elsewhere)."""
    status = Path("/proc/self/status")
    if status.exists():
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        if match:
            return int(match.group(1)) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA allocator statistics, or the CPU RSS high-water mark (Linux >= 4.0: write 5 to
    /proc/self/clear_refs). Returns False where the CPU peak cannot be reset (it stays the process peak)."""
    if device.type == "cuda":  # cached blocks (e.g. of the peak calibration's matmuls) would count as reserved
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _read_peak(device: torch.device) -> dict[str, float]:
    """Peak since the last reset, GiB: CUDA max allocated and max reserved; CPU peak RSS of the process."""
    if device.type == "cuda":
        return {"allocated": torch.cuda.max_memory_allocated(device) / GIB,
                "reserved": torch.cuda.max_memory_reserved(device) / GIB}
    return {"rss": _cpu_peak_rss_bytes() / GIB}


def _max_of(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {key: max(a.get(key, 0.0), b.get(key, 0.0)) for key in {*a, *b}}


class PeakMemory:
    """Peak memory of training and of evaluation, measured separately.

    The defined reset point is construction: build it after the model and optimizer exist, right before
    the first step. Wrap every evaluation in `evaluating()`: the peak up to there belongs to training, the
    peak inside to evaluation, and each phase keeps its max over all its stretches.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
        self.earlier: dict[str, dict[str, float]] = {"train": {}, "eval": {}}  # earlier processes that trained
        self.per_phase = reset_peak_memory(device)

    def _close(self, phase: str) -> None:
        for key, value in _read_peak(self.device).items():
            self.peaks[phase][key] = max(self.peaks[phase].get(key, 0.0), value)
        self.per_phase = reset_peak_memory(self.device) and self.per_phase

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        self._close("train")
        try:
            yield
        finally:
            self._close("eval")

    def state_dict(self, trained: bool) -> dict:
        """The peaks of this run's processes that trained so far (`trained`: did this one?), for a checkpoint."""
        self._close("train")
        mine = self.peaks if trained else {"train": {}, "eval": {}}
        return {phase: _max_of(self.earlier[phase], mine[phase]) for phase in ("train", "eval")}

    def load_state_dict(self, state: dict) -> None:
        self.earlier = {phase: dict(state[phase]) for phase in ("train", "eval")}

    def summary(self, trained: bool = True) -> ResultRow:
        """Results-row fields over the run's processes that trained (`trained`: did this one? A process resumed
        after the last checkpoint that only evaluates contributes its evaluation peak, not a training peak).
        `peak_memory_gb` is the larger of the two phases' peaks (allocated on CUDA, RSS on CPU). Without a
        resettable CPU peak, training carries the whole-process peak and evaluation is None rather than a copy
        of it."""
        self._close("train")
        main = "allocated" if self.device.type == "cuda" else "rss"
        train = _max_of(self.earlier["train"], self.peaks["train"] if trained else {})
        evaluation = _max_of(self.earlier["eval"], self.peaks["eval"]) if self.per_phase else {}
        out = {
            "peak_memory_gb": max(train.get(main, 0.0), evaluation.get(main, 0.0)),
            "train_peak_memory_gb": train.get(main),
            "eval_peak_memory_gb": evaluation.get(main),
            "peak_memory_kind": ("cuda_max_allocated" if self.device.type == "cuda" else
                                 "cpu_peak_rss_per_phase" if self.per_phase else "cpu_peak_rss_whole_process"),
        }
        if "reserved" in train:
            out.update(train_peak_memory_reserved_gb=train["reserved"],
                       eval_peak_memory_reserved_gb=evaluation.get("reserved"))
        return row_fields(**out)


# ---------------------------------------------------------------- static memory


def stored_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors holding a tensor's data: itself, or a subclass's inner tensors (torchao's quantized
    optimizer states keep codes and scales inside)."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            yield from stored_tensors(getattr(t, name))
    else:
        yield t


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes actually allocated for a tensor, so 8-bit states show their real size."""
    return sum(x.numel() * x.element_size() for x in stored_tensors(t))


def is_8bit(t: torch.Tensor) -> bool:
    """Whether a tensor (or a quantized subclass's inner tensors) stores 8-bit integer codes."""
    return any(x.dtype in (torch.uint8, torch.int8) for x in stored_tensors(t))


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps 32-bit states for tensors with fewer elements (its optimizers' `min_8bit_size` default); its
8-bit states carry one float32 absmax per BNB_BLOCK_SIZE elements."""


def predicted_static_bytes(pc: PrecisionConfig, shapes: dict[str, list[tuple[int, ...]]]) -> dict:
    """Weights, gradients and AdamW moments (and Kahan compensation buffers) in bytes as the config's fields say
    they are allocated. Independent of the run: shapes x dtype sizes."""
    record = pc.to_record()
    dtype_of = {"body": record["weight_dtype"], "head": record["head_weight_dtype"] or record["weight_dtype"]}
    tensors = [(math.prod(shape), _DTYPE_BYTES[dtype_of[role]]) for role, group in shapes.items() for shape in group]
    weights = sum(n * size for n, size in tensors)

    def state_bytes(n: int, weight_size: int) -> int:  # exp_avg + exp_avg_sq (+ Kahan compensation) of one tensor
        if pc.optimizer == "adamw_8bit":  # uint8 codes + a float32 absmax per block; small tensors stay 32-bit
            return 2 * (n + 4 * math.ceil(n / BNB_BLOCK_SIZE)) if n >= BNB_MIN_8BIT_SIZE else 2 * n * 4
        moments = n * (_DTYPE_BYTES[record["exp_avg_dtype"]] + _DTYPE_BYTES[record["exp_avg_sq_dtype"]])
        return moments + (n * weight_size if pc.weight_update_rounding == "kahan" else 0)

    states = sum(state_bytes(n, size) for n, size in tensors)
    return {"weights": weights, "grads": weights, "optimizer_state": states, "parameters": sum(n for n, _ in tensors)}
