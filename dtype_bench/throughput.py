"""Training throughput, measured honestly: `StepTimer`, and the results row's throughput and MFU fields.

`StepTimer` counts optimizer steps only. The first `warmup_steps` are excluded (compilation, allocator and
cache warm-up). Timed steps are grouped into contiguous windows of `window_steps` steps, so everything the loop
does between two steps is paid for, except what the caller brackets with `pause()` ... `start()`: evaluation,
checkpointing and logging. On CUDA the window boundaries are CUDA events on the current stream, resolved only
in `summary()`, so timing adds no host sync to the loop; on CPU work is synchronous and `time.perf_counter` is
exact. The reported `samples_per_second` is the median over windows (min and max give the spread), not one
total that a single hiccup could move.

Given `last_step`, the timer checks itself against the host clock: a device synchronize when the first timed
window opens and another when the last step ends, and the host seconds between them against the sum of the
windows (`host_over_window_seconds`; `timer_check` 'agrees' within `TIMER_CHECK_TOLERANCE`, else 'differs').
The two measure the same stretch only when nothing was paused between them (no log or evaluation step inside
the timed steps: `paused_windows` says how many pauses there were). Only where windows are device events (CUDA):
on the host clock the two are one clock and could not disagree. `warmup_seconds` is the host time from the
first step's start to the first timed window (compilation, autotuning, allocator warm-up).

Under torchrun each process feeds its StepTimer its own samples and FLOPs, so the timer's numbers are per
device; `throughput_record` adds the job's samples/s (x the world size) and the MFU against the peaks of
`flops.calibrate_peaks`.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dtype_bench.flops import FLOPS_FORMULA

TIMER_CHECK_TOLERANCE = 0.05
"""Relative difference between host wall time and the summed timing windows that the timer check accepts."""


@dataclass
class _Window:
    start: object  # float seconds (CPU) or torch.cuda.Event
    end: object
    steps: int
    samples: int
    flops: float


@dataclass
class StepTimer:
    device: torch.device
    warmup_steps: int
    """Optimizer steps excluded before timing starts."""
    window_steps: int = 10
    """Optimizer steps per timing window; a window also ends at `pause()`."""
    last_step: int | None = None
    """The run's last optimizer step, where the host-clock check ends (None: no check)."""
    clock: Callable[[], float] = time.perf_counter
    """Host clock for non-CUDA devices and for the host-clock check (tests inject a fake one)."""
    _windows: list[_Window] = field(default_factory=list)
    _steps_seen: int = 0
    _open: _Window | None = None
    _reported_windows: int = 0
    _first_start: float | None = None
    _host_start: float | None = None
    _host_end: float | None = None
    _pauses: int = 0
    _earlier: int = 0
    """Windows of earlier processes of this run (a resumed run), first in `_windows`."""

    def _synchronized_clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock()

    def _mark(self) -> object:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self.clock()

    @staticmethod
    def _seconds(window: _Window) -> float:
        if isinstance(window.end, float):
            return window.end - window.start
        window.end.synchronize()
        return window.start.elapsed_time(window.end) / 1000.0  # CUDA events measure milliseconds

    def start(self, timed: bool = True) -> None:
        """Call at the top of an optimizer step (before its first micro-batch is fetched). `timed=False`
        leaves this step out (e.g. a step that also runs measurement-only work such as diagnostics)."""
        if self._first_start is None:
            self._first_start = self.clock()
        if not timed:
            self.pause()
        elif self._open is None and self._steps_seen >= self.warmup_steps:
            if self._host_start is None:  # synchronized only for the check: elsewhere no host sync
                self._host_start = self._synchronized_clock() if self.last_step is not None else self.clock()
            self._open = _Window(self._mark(), None, 0, 0, 0.0)

    def stop(self, samples: int, flops: float = 0.0) -> None:
        """Call after the optimizer step, with the samples (and model FLOPs) this process computed in it."""
        self._steps_seen += 1
        if self._open is None:
            return
        self._open.steps += 1
        self._open.samples += samples
        self._open.flops += flops
        if self._steps_seen == self.last_step:
            self._close()
            self._host_end = self._synchronized_clock()
        elif self._open.steps >= self.window_steps:
            end = self._close()
            self._open = _Window(end, None, 0, 0, 0.0)  # contiguous: the next window starts where this ended

    def _close(self) -> object:
        end = self._mark()
        self._open.end = end
        self._windows.append(self._open)
        self._open = None
        return end

    def pause(self) -> None:
        """End the open window before untimed work (evaluation, checkpointing, logging, end of training)."""
        if self._open is not None and self._open.steps:
            self._close()
            if self._host_end is None:
                self._pauses += 1
        self._open = None

    def state_dict(self) -> dict:
        """The closed windows as [seconds, steps, samples, flops] (resolving CUDA events: call at a checkpoint):
        a resumed process's timer continues the run's measurement instead of starting empty."""
        return {"windows": [[self._seconds(w), w.steps, w.samples, w.flops] for w in self._windows]}

    def load_state_dict(self, state: dict) -> None:
        """Put an earlier process's windows first (its warm-up stays excluded; this process excludes its own)."""
        earlier = [_Window(0.0, float(seconds), steps, samples, flops)
                   for seconds, steps, samples, flops in state["windows"]]
        self._windows[:0] = earlier
        self._earlier += len(earlier)
        self._reported_windows += len(earlier)

    def recent_samples_per_second(self) -> float | None:
        """Samples/s over the windows closed since the previous call (None if none): the step log's live rate.
        Call after `pause()`, at a log step (with CUDA it waits for those windows' events)."""
        recent, self._reported_windows = self._windows[self._reported_windows:], len(self._windows)
        seconds = sum(self._seconds(w) for w in recent)
        return sum(w.samples for w in recent) / seconds if seconds > 0 else None

    def summary(self) -> dict:
        """Median and spread over windows; call after training (resolves CUDA events: one sync)."""
        self.pause()
        timed = [(self._seconds(w), w) for w in self._windows]
        timed = [(s, w) for s, w in timed if s > 0]
        if not timed:
            return {"samples_per_second": None, "timed_steps": 0, "timing_windows": 0,
                    "timing_note": f"no optimizer step after the {self.warmup_steps} warm-up steps"}
        rates = [w.samples / s for s, w in timed]
        samples = sum(w.samples for _, w in timed)
        flops = sum(w.flops for _, w in timed)
        return {
            "samples_per_second": statistics.median(rates),
            "samples_per_second_min": min(rates),
            "samples_per_second_max": max(rates),
            "timing_windows": len(rates),
            "timed_steps": sum(w.steps for _, w in timed),
            "timed_samples": samples,
            "timed_seconds": sum(s for s, _ in timed),
            "timing_warmup_steps": self.warmup_steps,
            "model_flops_per_sample": flops / samples if flops else None,
            "warmup_seconds": self._warmup_seconds(),
            **self._timer_check(sum(s for s, _ in timed)),
        }

    def _warmup_seconds(self) -> float | None:
        if self._first_start is None or self._host_start is None:
            return None
        return self._host_start - self._first_start

    def _timer_check(self, window_seconds: float) -> dict:
        if self._host_end is None or self._earlier or all(isinstance(w.end, float) for w in self._windows):
            return {}  # no check asked for, the last step never reached, windows of an earlier process (resumed),
            # or windows on the host clock already
        host = self._host_end - self._host_start
        ratio = host / window_seconds
        return {"host_timed_seconds": host, "host_over_window_seconds": ratio, "paused_windows": self._pauses,
                "timer_check": "agrees" if abs(ratio - 1) <= TIMER_CHECK_TOLERANCE else "differs"}


def throughput_record(speed: dict, peaks: dict, world_size: int = 1) -> dict:
    """Results-row throughput and MFU fields from `StepTimer.summary()` of a timer fed this process's samples and
    FLOPs (per device): `samples_per_second` (and its min/max) of the whole job = per device x `world_size` (every
    rank processes the same number of samples per step), `samples_per_second_per_device`, and MFU = model FLOPs
    per sample x samples/s per device over one device's measured and datasheet peak (None where unknown)."""
    per_device, per_sample = speed.get("samples_per_second"), speed.get("model_flops_per_sample")
    achieved = per_device * per_sample if per_device and per_sample else None
    ratio = lambda peak: achieved / peak if achieved and peak else None  # noqa: E731
    job = {k: speed[k] * world_size for k in ("samples_per_second", "samples_per_second_min",
                                              "samples_per_second_max") if speed.get(k) is not None}
    return {**speed, **job, "samples_per_second_per_device": per_device, "flops_formula": FLOPS_FORMULA,
            "model_flops_per_second": achieved, **peaks,
            "mfu": ratio(peaks.get("peak_flops_measured")), "mfu_datasheet": ratio(peaks.get("peak_flops_datasheet"))}
