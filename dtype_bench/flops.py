"""Model FLOPs and the peaks MFU is measured against.

MFU: model FLOPs per sample (`training_flops_per_sample`, per `FLOPS_FORMULA`) x samples/s of one device, over
one device's matmul peak measured in the same process in the config's compute dtype (`measure_matmul_peak`),
and over the datasheet peak where the GPU is known (`datasheet_peak_flops`); `calibrate_peaks` gives both to
`throughput.throughput_record`. float8 configs count their float8 matmuls against the bf16 peak: their MFU is
bf16-equivalent (`mfu_basis`), about twice what it would be against the float8 peak.
"""
from __future__ import annotations

import re
import time
from typing import Callable

import torch

FLOPS_FORMULA = "6*N*T + 12*L*d*T^2 + 6*H*P"
"""Training FLOPs per sample (forward + backward = 3 x forward): N non-embedding body parameters, T tokens
per sample (padded width: padding is computed too), L layers, d model width (attention scores and
attention-weighted values, 2 matmuls of 2*T^2*d forward FLOPs per layer), H output-head parameters applied at
P positions (1 for first-token classification, T for a language-model head)."""


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
    (r"H200 NVL", {"bfloat16": 835.5, "float16": 835.5, "tf32": 417.5, "float32": 60.0}),  # PCIe, 600 W
    (r"H200", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9}),  # SXM
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
