"""dtype_bench.throughput, .flops and .memory: what the throughput, memory and MFU numbers include and exclude.

No test asserts anything about real speed: a fake clock drives StepTimer, and the end-to-end test checks only
that time spent in evaluation is not inside any timing window.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from transformers import AutoModel, RobertaConfig

from dtype_bench import flops, throughput
from dtype_bench.memory import PeakMemory, reset_peak_memory
from tiny_run import SMALL

CPU = torch.device("cpu")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fake_timer(warmup_steps: int = 0, window_steps: int = 10) -> tuple[throughput.StepTimer, FakeClock]:
    clock = FakeClock()
    return throughput.StepTimer(CPU, warmup_steps=warmup_steps, window_steps=window_steps, clock=clock), clock


def train_steps(timer: throughput.StepTimer, clock: FakeClock, n: int, seconds: float, samples: int = 32,
                flops: float = 0.0) -> None:
    for _ in range(n):
        timer.start()
        clock.advance(seconds)
        timer.stop(samples, flops)


def test_warmup_steps_and_slow_evaluation_and_logging_are_not_timed():
    timer, clock = fake_timer(warmup_steps=3, window_steps=4)
    train_steps(timer, clock, 3, seconds=100.0)  # compilation-like warm-up
    for _ in range(3):
        train_steps(timer, clock, 4, seconds=2.0)
        timer.pause()
        clock.advance(500.0)  # evaluation, checkpointing, log flush
    summary = timer.summary()
    assert summary["samples_per_second"] == 16.0  # 32 samples / 2 s, nothing else
    assert summary["timed_steps"] == 12 and summary["timing_windows"] == 3
    assert summary["timed_seconds"] == 24.0


def test_work_between_steps_is_timed_unless_paused():
    timer, clock = fake_timer(window_steps=2)
    for _ in range(6):
        timer.start()
        clock.advance(1.0)
        timer.stop(10)
        clock.advance(1.0)  # per-step bookkeeping the loop does: part of training's cost
    # Windows are contiguous: [0, 3] (no gap before the first step), [3, 7], [7, 11] -> 6.67, 5, 5 samples/s.
    assert timer.summary()["samples_per_second"] == 5.0


def test_untimed_step_is_left_out():
    timer, clock = fake_timer(window_steps=10)
    train_steps(timer, clock, 2, seconds=1.0)
    timer.start(timed=False)  # e.g. a diagnostics step
    clock.advance(50.0)
    timer.stop(32)
    train_steps(timer, clock, 2, seconds=1.0)
    summary = timer.summary()
    assert summary["samples_per_second"] == 32.0 and summary["timed_steps"] == 4


def test_rate_is_the_median_over_windows_with_min_and_max_as_spread():
    timer, clock = fake_timer(window_steps=2)
    for seconds in (1.0, 2.0, 4.0, 0.5, 8.0):  # one outlier window each way
        train_steps(timer, clock, 2, seconds=seconds, samples=8)
    summary = timer.summary()
    assert summary["samples_per_second"] == 4.0  # rates 8, 4, 2, 16, 1 -> median 4
    assert (summary["samples_per_second_min"], summary["samples_per_second_max"]) == (1.0, 16.0)
    assert summary["timing_windows"] == 5


def test_flops_per_sample_is_averaged_over_timed_steps_only():
    timer, clock = fake_timer(warmup_steps=1, window_steps=2)
    train_steps(timer, clock, 1, seconds=1.0, samples=10, flops=1e9)  # warm-up: not counted
    train_steps(timer, clock, 2, seconds=1.0, samples=10, flops=100.0)
    train_steps(timer, clock, 2, seconds=1.0, samples=10, flops=300.0)
    assert timer.summary()["model_flops_per_sample"] == 20.0


def test_no_timed_step_reports_none_with_the_reason():
    timer, clock = fake_timer(warmup_steps=5)
    train_steps(timer, clock, 5, seconds=1.0)
    summary = timer.summary()
    assert summary["samples_per_second"] is None and summary["timed_steps"] == 0
    assert "warm-up" in summary["timing_note"]


@pytest.mark.parametrize("head_per_token", [False, True])
def test_flops_counter_agrees_with_torchs_flop_counter_on_a_real_training_step(head_per_token):
    """torch.utils.flop_counter counts every matmul (linear layers, SDPA attention, forward and backward) of a real
    step; the formula may only exceed it by what it adds on purpose: biases and LayerNorm parameters counted as
    matmul parameters (about 1.4% here). Sequence 128 at width 64 gives attention a quarter of the FLOPs, so a wrong
    attention term fails too."""
    from torch.utils.flop_counter import FlopCounterMode

    d, layers, ffn, labels, T, batch = 64, 2, 256, 10, 128, 2
    config = RobertaConfig(vocab_size=100, hidden_size=d, num_hidden_layers=layers, num_attention_heads=1,
                           intermediate_size=ffn, max_position_embeddings=T + 2, type_vocab_size=1)
    encoder = AutoModel.from_config(config, add_pooling_layer=False, attn_implementation="sdpa")
    head = torch.nn.Linear(d, labels)
    with FlopCounterMode(display=False) as counter:
        hidden = encoder(input_ids=torch.randint(3, 100, (batch, T))).last_hidden_state
        head(hidden if head_per_token else hidden[:, 0]).sum().backward()
    counted = counter.get_total_flops() / batch
    formula = flops.flops_counter(encoder, head, head_per_token=head_per_token)(T)
    assert counted <= formula <= 1.02 * counted, (formula, counted)


def test_throughput_is_per_device_and_mfu_uses_one_devices_peak():
    """A timer fed one rank's samples and FLOPs: samples/s per device; the job's samples/s is world_size times it;
    MFU = FLOPs/sample x per-device samples/s over one device's peak, so it does not grow with the world size."""
    speed = {"samples_per_second": 100.0, "samples_per_second_min": 90.0, "samples_per_second_max": 110.0,
             "model_flops_per_sample": 1e9}
    peaks = {"peak_flops_measured": 4e11, "peak_flops_datasheet": 1e12}
    single, two = throughput.throughput_record(speed, peaks, 1), throughput.throughput_record(speed, peaks, 2)
    assert single["model_flops_per_second"] == two["model_flops_per_second"] == 1e11
    assert single["mfu"] == two["mfu"] == 0.25 and single["mfu_datasheet"] == two["mfu_datasheet"] == 0.1
    assert two["samples_per_second"] == 200.0 and two["samples_per_second_per_device"] == 100.0
    assert (two["samples_per_second_min"], two["samples_per_second_max"]) == (180.0, 220.0)
    unknown = throughput.throughput_record({"samples_per_second": None}, {"peak_flops_measured": 4e11,
                                                                      "peak_flops_datasheet": None})
    assert unknown["mfu"] is None and unknown["mfu_datasheet"] is None


def test_matmul_calibration_reports_the_best_rate_of_2n3_flops():
    times = iter([0.0, 0.0, 0.3, 0.3, 0.3, 0.4, 0.4, 0.4, 0.6, 0.6])  # matmuls of 0.3 s, 0.1 s, 0.2 s; then past 0.5 s
    peak = flops.measure_matmul_peak(CPU, torch.float32, size=64, seconds=0.5, clock=lambda: next(times))
    assert peak == pytest.approx(2 * 64**3 / 0.1)


def test_calibrate_peaks_labels_the_dtype_and_a_float8_mfu_as_bf16_equivalent(monkeypatch):
    calls = []
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda device, dtype: calls.append(dtype) or 7e9)
    peaks = flops.calibrate_peaks(CPU, torch.bfloat16, tf32=False)
    assert calls == [torch.bfloat16] and peaks["peak_flops_measured"] == 7e9
    assert peaks["peak_flops_datasheet"] is None, "no datasheet for a CPU"
    assert peaks["peak_flops_dtype"] == "bfloat16" and peaks["mfu_basis"] == "compute dtype peak"
    fp8 = flops.calibrate_peaks(CPU, torch.bfloat16, tf32=False, fp8=True)
    assert fp8["peak_flops_dtype"] == "bfloat16" and fp8["mfu_basis"].startswith("bfloat16-equivalent")
    assert flops.calibrate_peaks(CPU, torch.float32, tf32=True)["peak_flops_dtype"] == "float32+tf32"


@pytest.mark.parametrize("name, dtype, tf32, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.4),
    ("NVIDIA H100 PCIe", torch.float16, False, 756.0),
    ("NVIDIA H200", torch.bfloat16, False, 989.4),
    ("NVIDIA H200 NVL", torch.bfloat16, False, 835.5),  # not the SXM part's 989.4
    ("NVIDIA A100-SXM4-80GB", torch.float32, True, 156.0),
    ("NVIDIA A100-SXM4-80GB", torch.float32, False, 19.5),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, False, None),  # no bf16 tensor cores
    ("Some Future GPU", torch.bfloat16, False, None),
])
def test_datasheet_peaks(name, dtype, tf32, tflops):
    peak = flops.datasheet_peak_flops(name, dtype, tf32)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_cpu_training_and_evaluation_peaks_are_separate():
    if not reset_peak_memory(CPU):
        pytest.skip("the RSS high-water mark cannot be reset on this system")
    memory = PeakMemory(CPU)
    with memory.evaluating():
        big = np.ones(40_000_000)  # 320 MB touched only during "evaluation"
        del big
    summary = memory.summary()
    assert summary["peak_memory_kind"] == "cpu_peak_rss_per_phase"
    assert summary["eval_peak_memory_gb"] - summary["train_peak_memory_gb"] > 0.25
    assert summary["peak_memory_gb"] == summary["eval_peak_memory_gb"]


def test_slow_evaluation_in_run_py_is_outside_every_timing_window(small_cache_dir, tmp_path, monkeypatch):
    from experiments.classification import run as classification_run

    sleep_s, evaluations = 1.5, []
    real_evaluate = classification_run.evaluate

    def slow_evaluate(*args, **kwargs):
        evaluations.append(time.perf_counter())
        time.sleep(sleep_s)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(classification_run, "evaluate", slow_evaluate)
    code = classification_run.main([*SMALL, "--data_dir", str(small_cache_dir), "--output_dir", str(tmp_path / "out"),
                                    "--config", "fp32_baseline", "--max_steps", "4", "--eval_steps", "2",
                                    "--log_every", "1", "--timing_warmup_steps", "0", "--diagnostics_every", "0"])
    assert code == 0
    row = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[-1])
    assert row["status"] == "completed" and row["timed_steps"] == 4
    validation_evals = len(evaluations) - 1  # the last one is the test split, after training
    assert validation_evals == 2
    assert row["timed_seconds"] <= row["train_wall_seconds"] - validation_evals * sleep_s
    assert row["mfu"] == pytest.approx(row["model_flops_per_sample"] * row["samples_per_second_per_device"]
                                       / row["peak_flops_measured"])
    assert row["samples_per_second"] == row["samples_per_second_per_device"]  # one process
    assert row["eval_peak_memory_gb"] is not None
