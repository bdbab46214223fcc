"""Training throughput, memory and MFU, measured honestly. Shared by every experiment and the benchmarks.

Throughput (`StepTimer`) counts optimizer steps only. The first `warmup_steps` are excluded (compilation,
allocator and cache warm-up). Timed steps are grouped into contiguous windows of `window_steps` steps, so
everything the loop does between two steps is paid for, except what the caller brackets with `pause()` ...
`start()`: evaluation, checkpointing and logging. On CUDA the window boundaries are CUDA events on the
current stream, resolved only in `summary()`, so timing adds no host sync to the loop; on CPU work is
synchronous and `time.perf_counter` is exact. The reported `samples_per_second` is the median over windows
(min and max give the spread), not one total that a single hiccup could move.

Memory (`PeakMemory`) keeps the training and evaluation peaks apart. CUDA: the allocator's peak statistics
are reset when a phase begins and read when it ends (max allocated and max reserved, separately). CPU: the
process's resident-set high-water mark (VmHWM), reset per phase through /proc/self/clear_refs where Linux
allows it; elsewhere it is the whole-process peak since start, and `peak_memory_kind` says which.

MFU: model FLOPs per sample (`training_flops_per_sample`) x samples/s of one device, over one device's matmul
peak measured in the same process in the config's compute dtype (`measure_matmul_peak`), and over the datasheet
peak where the GPU is known (`datasheet_peak_flops`). Under torchrun each process feeds its StepTimer its own
samples and FLOPs, so the timer's numbers are per device; `throughput_record` adds the job's samples/s (x the
world size). float8 configs count their float8 matmuls against the bf16 peak: their MFU is bf16-equivalent
(`mfu_basis`), about twice what it would be against the float8 peak.
"""
from __future__ import annotations

import contextlib
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

GIB = 2**30
FLOPS_FORMULA = "6*N*T + 12*L*d*T^2 + 6*H*P"
"""Training FLOPs per sample (forward + backward = 3 x forward): N non-embedding body parameters, T tokens
per sample (padded width: padding is computed too), L layers, d model width (attention scores and
attention-weighted values, 2 matmuls of 2*T^2*d forward FLOPs per layer), H output-head parameters applied at
P positions (1 for first-token classification, T for a language-model head)."""


# ---------------------------------------------------------------- throughput


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
    clock: Callable[[], float] = time.perf_counter
    """Host clock for non-CUDA devices (tests inject a fake one)."""
    _windows: list[_Window] = field(default_factory=list)
    _steps_seen: int = 0
    _open: _Window | None = None
    _reported_windows: int = 0

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
        if not timed:
            self.pause()
        elif self._open is None and self._steps_seen >= self.warmup_steps:
            self._open = _Window(self._mark(), None, 0, 0, 0.0)

    def stop(self, samples: int, flops: float = 0.0) -> None:
        """Call after the optimizer step, with the samples (and model FLOPs) this process computed in it."""
        self._steps_seen += 1
        if self._open is None:
            return
        self._open.steps += 1
        self._open.samples += samples
        self._open.flops += flops
        if self._open.steps >= self.window_steps:
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
        self._open = None

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
        }


# ---------------------------------------------------------------- memory


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
    if device.type == "cuda":
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


def peak_memory(device: torch.device) -> dict:
    """Results-row fields of one peak since the last `reset_peak_memory` (no train/eval split: prefer
    `PeakMemory` in a loop that evaluates)."""
    peak = _read_peak(device)
    if device.type == "cuda":
        return {"peak_memory_gb": peak["allocated"], "peak_memory_reserved_gb": peak["reserved"],
                "peak_memory_kind": "cuda_max_allocated"}
    return {"peak_memory_gb": peak["rss"], "peak_memory_kind": "cpu_peak_rss_process"}


class PeakMemory:
    """Peak memory of training and of evaluation, measured separately.

    The defined reset point is construction: build it after the model and optimizer exist, right before
    the first step. Wrap every evaluation in `evaluating()`: the peak up to there belongs to training, the
    peak inside to evaluation, and each phase keeps its max over all its stretches.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
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

    def summary(self) -> dict:
        """Results-row fields. `peak_memory_gb` is the larger of the two phases' peaks (allocated on CUDA,
        RSS on CPU). Without a resettable CPU peak, training carries the whole-process peak and evaluation
        is None rather than a copy of it."""
        self._close("train")
        main = "allocated" if self.device.type == "cuda" else "rss"
        train, evaluation = self.peaks["train"], self.peaks["eval"] if self.per_phase else {}
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
        return out


# ---------------------------------------------------------------- FLOPs and MFU


def training_flops_per_sample(*, body_params: int, n_layers: int, d_model: int, seq_len: float,
                              head_params: int, head_positions: float) -> float:
    """Model FLOPs of one training sample (forward + backward), per `FLOPS_FORMULA`."""
    return (6 * body_params * seq_len + 12 * n_layers * d_model * seq_len**2
            + 6 * head_params * head_positions)


def non_embedding_params(module: torch.nn.Module) -> int:
    """Parameters outside nn.Embedding layers: embedding lookups are gathers, not matmuls."""
    embedding = {id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in embedding)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, *, size: int | None = None,
                        seconds: float = 0.5, clock: Callable[[], float] = time.perf_counter) -> float:
    """Best achieved FLOP/s (2 n^3 per n x n matmul) of square matmuls in `dtype` on `device` over ~`seconds` (a
    short calibration run in the same process as the training it normalises). Sizes: 8192 on CUDA (reaches
    tensor-core peak), 1024 elsewhere (large enough for the CPU's blocked kernels, small enough for fp16
    emulation). `clock`: host clock (tests inject a fake one)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # kernel selection, first-touch
    _sync(device)
    best, deadline = 0.0, clock() + seconds
    while True:
        t0 = clock()
        a @ b
        _sync(device)
        elapsed = clock() - t0
        best = max(best, 2 * size**3 / elapsed)
        if clock() >= deadline:
            return best


# Dense (no structured sparsity) tensor-core peaks from NVIDIA datasheets, TFLOP/s, by device-name pattern.
# "tf32" applies to fp32 matmuls with TF32 allowed; "fp32" is the non-tensor-core FP32 peak.
DATASHEET_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H200", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9}),
    (r"H100.*(PCIe)", {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.2}),
    (r"H100.*NVL", {"bfloat16": 835.5, "float16": 835.5, "tf32": 417.5, "float32": 60.0}),
    (r"H100", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9}),  # SXM5
    (r"A100", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5}),
    (r"L40S", {"bfloat16": 362.0, "float16": 362.0, "tf32": 183.0, "float32": 91.6}),
    (r"\bL4\b", {"bfloat16": 121.0, "float16": 121.0, "tf32": 60.0, "float32": 30.3}),
    (r"A10G", {"bfloat16": 70.0, "float16": 70.0, "tf32": 35.0, "float32": 31.2}),
    (r"V100", {"float16": 125.0, "float32": 15.7}),
    (r"\bT4\b", {"float16": 65.0, "float32": 8.1}),
)


def datasheet_peak_flops(device_name: str, compute_dtype: torch.dtype, tf32: bool = False) -> float | None:
    """The vendor's dense peak FLOP/s for this device and compute dtype, or None if the device is unknown."""
    key = str(compute_dtype).removeprefix("torch.")
    if compute_dtype == torch.float32 and tf32:
        key = "tf32"
    for pattern, peaks in DATASHEET_TFLOPS:
        if re.search(pattern, device_name):
            return peaks[key] * 1e12 if key in peaks else None
    return None


def flops_counter(body: torch.nn.Module, head: torch.nn.Module, *, head_per_token: bool) -> Callable[[int], float]:
    """seq_len -> training FLOPs per sample of an HF transformer body (its config gives layers and width) and
    an output head applied at the first position (classification) or at every position (language model)."""
    body_params, head_params = non_embedding_params(body), sum(p.numel() for p in head.parameters())
    n_layers, d_model = body.config.num_hidden_layers, body.config.hidden_size

    def flops(seq_len: int) -> float:
        return training_flops_per_sample(body_params=body_params, n_layers=n_layers, d_model=d_model,
                                         seq_len=seq_len, head_params=head_params,
                                         head_positions=seq_len if head_per_token else 1)

    return flops


def calibrate_peaks(device: torch.device, compute_dtype: torch.dtype, *, tf32: bool, fp8: bool = False) -> dict:
    """Measured and datasheet peak FLOP/s of one device for this run's compute dtype. Call after the run's matmul
    precision flags are set (so an fp32 calibration uses TF32 exactly when the run does) and before the
    peak-memory reset point (the calibration's buffers are not the model's memory). `fp8`: the run's encoder
    matmuls are float8; the peak stays the compute dtype's and `mfu_basis` says the MFU is bf16-equivalent."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {"peak_flops_measured": measure_matmul_peak(device, compute_dtype),
            "peak_flops_datasheet": datasheet_peak_flops(name, compute_dtype, tf32) if name else None,
            "peak_flops_dtype": str(compute_dtype).removeprefix("torch.") + ("+tf32" if tf32 else ""),
            "mfu_basis": f"{str(compute_dtype).removeprefix('torch.')}-equivalent (float8 matmuls counted against "
                         "this peak)" if fp8 else "compute dtype peak"}


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
