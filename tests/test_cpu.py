"""Busy cores and emulated low-precision matmuls: the thread choice and the recorded `skipped` rows."""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess

import pytest
import torch

import tiny_run
from dtype_bench import cpu, precision


def test_threads_are_the_machines_whatever_the_load_and_a_busy_machine_is_warned_about(monkeypatch):
    assert cpu.pick_threads(None, cores=2, busy=0.1, default=2) == (2, None)
    threads, warning = cpu.pick_threads(None, cores=2, busy=1.7, default=2)
    assert threads == 2 and "1.7 of 2 cores are busy" in warning and "--threads" in warning
    assert cpu.pick_threads(None, cores=16, busy=5.0, default=8) == (8, None)  # 11 cores free for 8 threads
    assert cpu.pick_threads(None, cores=16, busy=9.0, default=8)[0] == 8  # 7 free: warned, not fewer threads
    monkeypatch.setattr(cpu, "busy_cores", lambda: pytest.fail("sampled the load although --threads was given"))
    assert cpu.pick_threads(3, cores=2, default=2) == (3, None)  # --threads wins
    monkeypatch.setattr(cpu, "busy_cores", lambda: 2.0)
    assert cpu.pick_threads(None)[0] == torch.get_num_threads()  # torch's count in this process


@pytest.mark.parametrize("configs", ["fp32_baseline", "fp32_baseline,amp_bf16"], ids=["single run", "sweep"])
def test_run_py_without_threads_keeps_torchs_count_on_a_busy_machine_and_a_sweep_passes_it_on(
        configs, small_cache_dir, tmp_path, monkeypatch, capsys):
    """run.py's main in-process on a machine sampled fully busy: the run keeps this process's torch thread count
    and prints the warning; a sweep passes that count to every run it starts (the run or sweep itself is replaced
    by a stub that records what it was given)."""
    from dtype_bench import sweep
    from experiments.classification import run

    seen = {}

    def train_one(*args, **kwargs):
        seen["threads"] = torch.get_num_threads()
        return {"status": "completed", "steps": 0}

    def run_sweep(script, grid, passthrough, *args, **kwargs):
        seen["passthrough"] = passthrough
        return 0

    monkeypatch.setattr(cpu, "busy_cores", lambda: float(os.cpu_count() or 1))
    monkeypatch.setattr(run, "train_one", train_one)
    monkeypatch.setattr(sweep, "run_sweep", run_sweep)
    argv = [*tiny_run.SMALL, "--data_dir", str(small_cache_dir), "--output_dir", str(tmp_path / "out"),
            "--config", configs]
    at = argv.index("--threads")
    del argv[at:at + 2]
    expected, pinned = 2, torch.get_num_threads()  # two, so that a load-based choice (one, here) would show
    torch.set_num_threads(expected)
    try:
        assert run.main(argv) == 0
    finally:
        torch.set_num_threads(pinned)
    out = capsys.readouterr().out
    assert f"this run uses {expected} torch thread(s)" in out and "cores are busy" in out
    if "," in configs:
        passthrough = seen["passthrough"]
        assert passthrough[passthrough.index("--threads") + 1] == str(expected)
    else:
        assert seen["threads"] == expected


def test_matmul_slowdown_is_a_measured_ratio():
    for dtype in cpu.LOW_PRECISION:
        slowdown = cpu.matmul_slowdown(dtype)
        assert math.isfinite(slowdown) and slowdown > 0


def test_too_slow_reason_names_the_measured_factor(monkeypatch):
    monkeypatch.setattr(cpu, "matmul_slowdown", lambda dtype: 18.0 if dtype == torch.float16 else 0.9)
    cpu_device = torch.device("cpu")
    reason = cpu.too_slow_reason(precision.get("amp_fp16"), cpu_device, 4.0)
    assert "float16 matmuls measured 18.0x slower" in reason and "--max_cpu_slowdown 4" in reason
    assert cpu.too_slow_reason(precision.get("amp_fp16"), cpu_device, None) is None  # flag not given
    assert cpu.too_slow_reason(precision.get("amp_fp16"), cpu_device, 20.0) is None
    assert cpu.too_slow_reason(precision.get("amp_bf16"), cpu_device, 4.0) is None  # native here
    assert cpu.too_slow_reason(precision.get("fp32_baseline"), cpu_device, 0.0) is None


@pytest.mark.slow
def test_forced_emulation_limit_records_skipped_rows_and_the_sweep_pins_threads(small_cache_dir, tmp_path):
    """--max_cpu_slowdown below any measurable ratio: the low-precision configs are `skipped` with the measured
    factor, fp32 trains; every run of the sweep gets the thread count the sweep chose."""
    command = tiny_run.command(small_cache_dir, tmp_path / "out", "--config", "fp32_baseline,amp_fp16",
                               "--max_steps", "2", "--eval_steps", "2", "--max_cpu_slowdown", "0.001")
    at = command.index("--threads")
    del command[at:at + 2]  # let the sweep choose
    proc = subprocess.run(command, env=tiny_run.ENV, cwd=tiny_run.ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["config"]: r for r in tiny_run.rows(tmp_path / "out")}
    assert rows["fp32_baseline"]["status"] == "completed"
    assert rows["amp_fp16"]["status"] == "skipped"
    assert "float16 matmuls measured" in rows["amp_fp16"]["reason"] and "0.001" in rows["amp_fp16"]["reason"]
    assert rows["amp_fp16"]["train_config"]["threads"] == rows["fp32_baseline"]["train_config"]["threads"] >= 1


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16).to(torch.int32)


def _spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gap between x (float64) and the next representable `dtype` value of larger magnitude (its ulp)."""
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    _, exponent = torch.frexp(x)
    floor = torch.finfo(dtype).tiny * 2.0**-mantissa_bits  # subnormal spacing
    return torch.clamp(torch.ldexp(torch.ones_like(x), exponent - 1 - mantissa_bits), min=floor)


@pytest.mark.parametrize("dtype", cpu.LOW_PRECISION, ids=["fp16", "bf16"])
def test_emulated_matmuls_equal_torchs_own_kernels_within_one_ulp(dtype):
    """Each of mm, addmm, bmm and baddbmm in fp16/bf16 under `EmulatedMatmuls` against the same op on torch's own
    CPU kernel for the dtype (native or emulated by torch, whichever this CPU has): the same dtype, and every
    element apart by at most one ulp of the output plus what two fp32 summations in different orders can differ
    by (2·k·2^-24 times the sum of |products|, k = 256 terms; it matters only where the terms cancel), and most
    elements bit-identical. fp32 ops pass through unchanged."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(shape, generator=g) for shape in ((48, 256), (256, 40), (48, 40)))
    cases = {"mm": lambda x, y, z: torch.mm(x, y), "addmm": lambda x, y, z: torch.addmm(z, x, y, beta=0.5),
             "bmm": lambda x, y, z: torch.bmm(x.view(4, 12, 256), y.expand(4, 256, 40)),
             "baddbmm": lambda x, y, z: torch.baddbmm(z.view(4, 12, 40), x.view(4, 12, 256), y.expand(4, 256, 40))}
    for name, op in cases.items():
        low = [t.to(dtype) for t in (a, b, c)]
        native = op(*low)
        with cpu.EmulatedMatmuls():
            emulated = op(*low)
            fp32 = op(a, b, c)
        assert emulated.dtype == dtype and torch.equal(fp32, op(a, b, c)), name
        magnitude = op(*(t.double().abs() for t in low))  # the sum of |terms| of each output element
        n, e = native.double(), emulated.double()
        allowed = _spacing(torch.maximum(n.abs(), e.abs()), dtype) + 2 * 256 * 2.0**-24 * magnitude
        assert bool(((n - e).abs() <= allowed).all()), (name, float(((n - e).abs() / allowed).max()))
        apart = (_bits(native) - _bits(emulated)).abs()
        assert float((apart == 0).float().mean()) > 0.5, name  # mostly bit-identical, not merely close


def test_emulated_matmuls_reach_the_backward_pass():
    """A bf16 Linear's forward and both backward matmuls run through the emulation (the mode is active while
    autograd runs), and its gradients equal torch's own kernel's within torch's bf16 comparison tolerance."""
    calls = []

    class Counting(cpu.EmulatedMatmuls):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in self.OPS and args[1].dtype in cpu.LOW_PRECISION:
                calls.append(func)
            return super().__torch_dispatch__(func, types, args, kwargs)

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for mode in (contextlib.nullcontext(), Counting()):
        layer.zero_grad()
        x.grad = None
        with mode:
            layer(x).float().square().sum().backward()
        grads.append((x.grad.clone(), layer.weight.grad.clone()))
    assert len(calls) == 3  # forward; backward: the input's and the weight's gradients
    for native, emulated in zip(*grads):
        torch.testing.assert_close(emulated, native)


def test_a_too_slow_config_trains_with_emulated_matmuls_and_its_costs_are_set_aside(small_cache_dir, tmp_path):
    """--emulate_slow_matmuls: a config --max_cpu_slowdown would skip trains, its row says `matmuls_emulated`,
    its losses follow the same run on torch's own fp16 kernel (every step within 1%), and the analysis keeps its
    quality and moves its speed and memory aside."""
    from analysis.experiment_data import EMULATION_COSTS, load_experiment
    from experiments.classification.run import main

    flags = [*tiny_run.SMALL, "--config", "amp_fp16", "--max_steps", "4", "--eval_steps", "4", "--log_every", "1",
             "--timing_warmup_steps", "1", "--data_dir", str(small_cache_dir)]
    assert main([*flags, "--max_cpu_slowdown", "0.001", "--emulate_slow_matmuls", "true",
                 "--output_dir", str(tmp_path / "emulated")]) == 0
    assert main([*flags, "--max_cpu_slowdown", "none", "--output_dir", str(tmp_path / "native")]) == 0
    (emulated,), (native,) = tiny_run.rows(tmp_path / "emulated"), tiny_run.rows(tmp_path / "native")
    assert (emulated["status"], emulated["matmuls_emulated"], native["matmuls_emulated"]) == ("completed", True, False)
    losses = [[r["loss"] for r in map(json.loads, tiny_run.step_log(out, row["run_id"])) if "eval" not in r]
              for out, row in ((tmp_path / "emulated", emulated), (tmp_path / "native", native))]
    assert len(losses[0]) == len(losses[1]) == 4
    assert all(math.isclose(e, n, rel_tol=0.01) for e, n in zip(*losses)), losses
    exp = load_experiment(tmp_path / "emulated")
    (row,) = exp.rows
    assert "samples_per_second" not in row and row["emulated_costs"]["samples_per_second"] > 0
    assert set(row["emulated_costs"]) <= set(EMULATION_COSTS) and row["micro_f1"] == emulated["micro_f1"]
    assert exp.emulated_configs() == ["amp_fp16"]
