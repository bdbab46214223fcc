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
from dtype_bench import memory, optimizers, precision, throughput
from dtype_bench.memory import stored_tensors
from transformers import RobertaConfig, RobertaModel


OPTIONAL = ("datasets", "torchao", "bitsandbytes", "optimi", "submitit", "xxhash", "dill", "multiprocess")
"""What the GPU image lacks (benchmarks/wheels.py's set, and submitit)."""
BLOCKER = """
import sys
from importlib.machinery import PathFinder
from pathlib import Path
HIDDEN = {hidden!r}
COPY = Path({copy!r})
OURS = ("dtype_bench", "experiments", "benchmarks", "analysis")


class BareImage(PathFinder):
    \"\"\"The path finder of an image without the optional packages (not found, no metadata: as if never installed)
    on which the project is imported only from the copy (never installed).\"\"\"

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        top = name.split(".")[0]
        if top in HIDDEN:
            return None
        spec = super().find_spec(name, path, target)
        if top in OURS and "." not in name and spec is not None:
            where = Path(spec.origin or next(iter(spec.submodule_search_locations)))
            if COPY not in where.parents:
                raise ImportError(f"{{name}} imported from {{where}}, outside the copy")
        return spec

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        hidden = {{h.replace("_", "-") for h in HIDDEN}} | {{"torch-optimi"}}
        return (d for d in super().find_distributions(*args, **kwargs)
                if d.metadata["Name"].lower().replace("_", "-") not in hidden)


sys.meta_path[sys.meta_path.index(PathFinder)] = BareImage
"""


def archive_copy(destination):
    """The tracked files as they are in the working tree (what `git archive` of this state holds)."""
    import shutil

    files = subprocess.run(["git", "ls-files", "-z"], cwd=tiny_run.ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = tiny_run.ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.mark.slow
def test_dry_run_completes_every_part_from_an_archive_copy_on_a_bare_image(tmp_path):
    """As on the GPU image: the project copied, not installed; datasets, torchao, bitsandbytes, torch-optimi and
    submitit not importable (a meta-path finder in sitecustomize). Every default part completes, LM included; the
    configs that need a missing package are skipped with their reason; no optional library's import noise."""
    try:
        copy = archive_copy(tmp_path / "copy")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"no git checkout to copy from ({e})")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(hidden=OPTIONAL, copy=str(copy)))
    out = tmp_path / "check"
    env = {**tiny_run.ENV, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry_run", "--output_dir", str(out),
                           "--cache_dir", str(tmp_path / "cache"), "--configs", "fp32_baseline,bf16_sr_bf16_moments"],
                          env=env, cwd=copy, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert {name: part["status"] for name, part in report["parts"].items()} == dict.fromkeys(
        gpu_check.DEFAULT_PARTS, "completed")
    assert all(v.startswith("missing") for v in report["packages"].values()), report["packages"]
    for part in ("classification", "lm"):
        rows = {r["config"]: r for r in report[part]}
        assert rows["fp32_baseline"]["status"] == "completed", rows["fp32_baseline"]
        assert rows["fp32_baseline"]["samples_per_second"] > 0
        assert rows["bf16_sr_bf16_moments"]["status"] == "skipped"
        assert "torchao" in rows["bf16_sr_bf16_moments"]["reason"]
    trainer = report["trainer"]
    assert [(r["config"], r["logging_nan_inf_filter"]) for r in trainer] == [("fp32_baseline", True),
                                                                            ("fp32_baseline", False)]
    assert all(r["trainer"]["status"] == "completed" and r["ratio"] > 0 for r in trainer)
    assert report["loader"]["headroom"] > 0
    assert not list(out.rglob("checkpoints")), "benchmark runs write no checkpoints"
    assert not (out / "data").exists(), "caches go to --cache_dir, not into the bundle"
    assert "Failed to load" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_dry_run_trains_skips_and_reports(tmp_path):
    """A subset of the parts (the full dry run starts a dozen processes: minutes on 2 busy cores)."""
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(tiny_run.ROOT / "benchmarks" / "gpu_check.py"), "--dry_run",
                           "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
                           "--parts", "data,classification,loader"],
                          env=tiny_run.ENV, cwd=tiny_run.ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert {name: part["status"] for name, part in report["parts"].items()} == {
        "data": "completed", "classification": "completed", "loader": "completed"}
    assert list(report["data"]) == ["classification"]  # only the cache the selected parts read
    rows = {r["config"]: r for r in report["classification"]}
    assert list(rows) == ["amp_bf16_fp8", "fp32_baseline"]  # VALUE_ORDER
    trained = rows["fp32_baseline"]
    assert trained["status"] == "completed" and trained["data"]["kind"] == "synthetic-ids"
    assert trained["samples_per_second"] > 0 and trained["timing_windows"] >= 1 and trained["train_peak_memory_gb"] > 0
    assert trained["tokens_per_second"] == pytest.approx(trained["samples_per_second"] * 32)  # full 32-token rows
    assert trained["warmup_seconds"] > 0 and any("scaled_dot_product" in op for op in trained["sdpa_ops"])
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
    predicted = memory.predicted_static_bytes(pc, shapes)
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
    assert gpu_check.FULL.deadline_s <= 9 * 60  # the whole check, installation included, by its own deadline
    assert gpu_check.FULL.run_timeout_s < gpu_check.FULL.budgets["classification"]
    assert gpu_check.FULL.steps - gpu_check.FULL.warmup_steps >= 3 * window
    assert set(gpu_check.FULL.budgets) == set(gpu_check.PARTS) == set(gpu_check.DRY_RUN.budgets)


def test_runs_go_in_order_of_value_and_given_configs_keep_their_order():
    queue = gpu_check.run_queue(gpu_check.FULL, list(gpu_check.DEFAULT_PARTS), None)
    assert queue[:8] == [("classification", "amp_bf16"), ("trainer", "amp_bf16"), ("classification", "amp_fp16"),
                         ("classification", "bf16_sr_fp32_moments"), ("classification", "fp32_tf32_matmul"),
                         ("classification", "amp_bf16_fp8"), ("classification", "fp32_baseline"), ("lm", "amp_bf16")]
    assert sorted(c for p, c in queue if p == "classification") == sorted(precision.REGISTRY)
    assert queue[-1] == ("loader", None) and len(queue) == len(set(queue))
    given = gpu_check.run_queue(gpu_check.FULL, ["classification", "trainer", "lm"], ["fp32_baseline", "amp_bf16"])
    assert given == [("classification", "fp32_baseline"), ("classification", "amp_bf16"),
                     ("trainer", "fp32_baseline"), ("trainer", "amp_bf16"),
                     ("trainer", "fp32_baseline" + gpu_check.NO_NAN_FILTER),
                     ("lm", "fp32_baseline"), ("lm", "amp_bf16")]


def test_a_run_starts_only_if_the_time_it_needs_is_left(tmp_path):
    check = gpu_check.Check(tmp_path, tmp_path, gpu_check.FULL, None, {"classification": 100.0}, 60.0,
                            gpu_check.time.monotonic() + 1000)
    assert check.why_not_start("classification") is None  # the cap (60 s) before any run
    check.spent["classification"], check.longest["classification"] = 50.0, 45.0
    assert "expected to need ~52 s, 50 s left" in check.why_not_start("classification")
    check.deadline = gpu_check.time.monotonic() + 10
    check.spent["classification"] = 0.0
    assert check.why_not_start("classification").startswith("not started")
