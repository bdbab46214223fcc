"""Training throughput and memory, measured honestly.

Throughput counts optimizer steps only: the first `warmup_steps` are excluded (compilation, allocator and
cache warm-up), evaluation / checkpointing / logging happen outside timed steps, and the device is
synchronised around timed regions (CUDA events on GPU). Steps are grouped into windows; the reported
`samples_per_second` is the median over windows, with min and max as the spread.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

import torch


@dataclass
class StepTimer:
    device: torch.device
    warmup_steps: int
    window_steps: int = 10
    """Steps per timing window; a window closes (one device sync) at most every window_steps steps."""
    _windows: list[tuple[float, int]] = field(default_factory=list)  # (seconds, samples)
    _steps_seen: int = 0
    _window_samples: int = 0
    _window_seconds: float = 0.0
    _window_count: int = 0
    _t0: float | None = None
    _event: torch.cuda.Event | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        """Call before an optimizer step's first micro-batch."""
        if self._steps_seen >= self.warmup_steps and self._t0 is None:
            self._t0 = self._now()

    def stop(self, samples: int) -> None:
        """Call after the optimizer step. Syncs only when a window closes."""
        self._steps_seen += 1
        if self._t0 is None:
            return
        self._window_samples += samples
        self._window_count += 1
        if self._window_count >= self.window_steps:
            self.pause()

    def pause(self) -> None:
        """Close the open window (before evaluation, checkpointing or the end of training)."""
        if self._t0 is None:
            return
        if self._window_count:
            self._windows.append((self._now() - self._t0, self._window_samples))
        self._t0, self._window_samples, self._window_count = None, 0, 0

    def summary(self) -> dict:
        rates = [samples / seconds for seconds, samples in self._windows if seconds > 0]
        if not rates:
            return {"samples_per_second": None, "timed_steps": 0, "timing_windows": 0}
        return {
            "samples_per_second": statistics.median(rates),
            "samples_per_second_min": min(rates),
            "samples_per_second_max": max(rates),
            "timing_windows": len(rates),
            "timed_seconds": sum(s for s, _ in self._windows),
            "timed_samples": sum(n for _, n in self._windows),
        }


def peak_memory(device: torch.device) -> dict:
    """Peak memory since the last `reset_peak_memory`. CUDA: allocator's max allocated and reserved.
    CPU: the process's peak resident set size (whole process, not resettable), labelled as such."""
    if device.type == "cuda":
        return {
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_memory_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
            "peak_memory_kind": "cuda_max_allocated",
        }
    return {
        "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "peak_memory_kind": "cpu_peak_rss_process",
    }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
