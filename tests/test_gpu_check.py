"""benchmarks/gpu_check.py: the dry run goes through the real scripts and writes the report; the static-memory
prediction agrees with the tensors an optimizer step really allocates, for every config this CPU can run."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch

import tiny_run


from benchmarks import gpu_check
from dtype_bench import optimizers, precision, throughput
from dtype_bench.memory import stored_tensors
from transformers import RobertaConfig, RobertaModel


def test_dry_run_trains_skips_and_reports(tmp_path):
    """A subset of the parts (the full dry run starts a dozen processes: minutes on 2 busy cores)."""
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(tiny_run.ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                           "--output_dir", str(out), "--parts", "data,classification,loader"],
                          env=tiny_run.ENV, cwd=tiny_run.ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert {name: part["status"] for name, part in report["parts"].items()} == {
        "data": "completed", "classification": "completed", "loader": "completed"}
    assert list(report["data"]) == ["classification"]  # only the cache the selected parts read
    rows = {r["config"]: r for r in report["classification"]}
    assert list(rows) == ["fp32_baseline", "amp_bf16_fp8"]
    trained = rows["fp32_baseline"]
    assert trained["status"] == "completed" and trained["data"]["kind"] == "synthetic-ids"
    assert trained["samples_per_second"] > 0 and trained["timing_windows"] >= 1 and trained["train_peak_memory_gb"] > 0
    assert trained["tokens_per_second"] == pytest.approx(trained["samples_per_second"] * 32)  # full 32-token rows
    assert rows["amp_bf16_fp8"]["status"] == "skipped" and "8.9" in rows["amp_bf16_fp8"]["reason"]
    static = {r["config"]: r for r in report["static_memory"]["rows"]}
    assert static["fp32_baseline"]["measured_over_predicted"] == pytest.approx(1.0, abs=0.01)
    assert report["loader"]["fastest_config"] == "fp32_baseline" and report["loader"]["headroom"] > 0
    assert report["environment"]["versions"]["torch"] == importlib.metadata.version("torch")
    markdown = (out / "gpu_check.md").read_text()
    assert markdown.strip() in proc.stdout and "| fp32_baseline | completed |" in markdown
    assert "EURLEX57K" not in json.dumps(trained["data"])


def _allocated_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a shared tensor counts once)."""
    storages = {}
    for t in tensors:
        for inner in stored_tensors(t):
            storages[inner.untyped_storage().data_ptr()] = inner.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("name", list(precision.REGISTRY))
def test_predicted_static_memory_is_what_an_optimizer_step_allocates(name):
    """Weights, gradients and AdamW moments of a small RoBERTa + head after one real optimizer step, against
    the prediction from the config's fields and the parameter shapes alone."""
    pc, device = precision.get(name), torch.device("cpu")
    reason = precision.unsupported_reason(pc, device)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    body = RobertaModel(RobertaConfig(vocab_size=600, hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                      intermediate_size=128, max_position_embeddings=34), add_pooling_layer=False)
    head = torch.nn.Linear(64, 300)
    precision.cast_model(body, head, pc)
    params = [*body.parameters(), *head.parameters()]
    optimizer = optimizers.build_optimizer(pc, [{"params": params}], lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=0.0, device=device)
    with precision.autocast(pc, device):
        loss = head(body(torch.randint(5, 600, (2, 16))).last_hidden_state[:, 0].to(head.weight.dtype)).float().sum()
    loss.backward()
    optimizer.step()
    shapes = {"body": [tuple(p.shape) for p in body.parameters()], "head": [tuple(p.shape) for p in head.parameters()]}
    predicted = gpu_check.predicted_static_bytes(pc, shapes)
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    measured = {"weights": _allocated_bytes(params), "grads": _allocated_bytes(p.grad for p in params),
                "optimizer_state": _allocated_bytes(states)}
    for kind, value in measured.items():
        assert value == pytest.approx(predicted[kind], rel=0.01), kind


def test_peak_order_names_the_pairs_that_contradict_the_prediction():
    rows = [{"config": "a", "predicted_bytes_per_param": {"w": 16.0}, "train_peak_memory_gb": 1.0},
            {"config": "b", "predicted_bytes_per_param": {"w": 8.0}, "train_peak_memory_gb": 2.0},
            {"config": "c", "predicted_bytes_per_param": {"w": 4.0}, "train_peak_memory_gb": 0.5}]
    order = gpu_check.peak_order(rows)
    assert order["configs_compared"] == 3 and len(order["inversions"]) == 1 and order["inversions"][0].startswith("a ")


def test_full_plan_fits_the_device_call_and_times_three_windows():
    window = throughput.StepTimer(torch.device("cpu"), warmup_steps=0).window_steps
    assert sum(gpu_check.FULL.budgets.values()) <= 8 * 60 - 30  # the 8 minutes, with margin
    assert gpu_check.FULL.steps - gpu_check.FULL.warmup_steps >= 3 * window
    assert set(gpu_check.FULL.budgets) == set(gpu_check.PARTS) == set(gpu_check.DRY_RUN.budgets)
    assert gpu_check.FULL.trainer_configs == ("fp32_baseline", "amp_bf16", "amp_fp16")
