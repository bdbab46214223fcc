"""torch.compile does what a row says: the diagnostics hooks change nothing a compiled graph guards on (no
recompile, no graph break, measured steps run eagerly and still measure), `compilation.CompileWatch` counts
recompiles and a fallback to eager as dynamo records them, and every config that compiles on this machine trains
the tiny preset with one graph compiled once, evaluations included."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn

import tiny_run
from dtype_bench import compilation, distributed, precision
from dtype_bench.loop import TrainingRun
from test_loop import Cfg

CPU = torch.device("cpu")


SCALE = {"k": 0}


def test_watch_counts_recompiles_with_their_reason_and_a_recompile_limit_hit_as_a_fallback():
    watch = compilation.CompileWatch()
    during = []
    torch._dynamo.callback_handler.register_start_callback(lambda _: during.append(watch.activity()))

    @torch.compile(backend="eager")
    def f(x):
        return x * SCALE["k"]

    with torch._dynamo.config.patch(recompile_limit=3):
        for k in range(5):  # a guard on SCALE["k"] fails each time: attempts 1, 2, then the limit (3) is hit
            SCALE["k"] = k
            assert torch.equal(f(torch.ones(2)), torch.full((2,), float(k)))  # eager past the limit: still right
    record = watch.record()
    assert during == ["compiling"] * 3 and watch.activity() is None  # what the progress lines show meanwhile
    assert record["frames_compiled"] == 1 and record["recompiles"] == 2
    assert record["recompile_limit_hits"] >= 1 and record["fell_back"]
    assert "SCALE" in record["recompile_reasons"][0] and record["recompile_limit"] == 8  # the patch is undone
    assert "hit recompile_limit" in compilation.summary_line(record)
    clean = compilation.CompileWatch()
    g = torch.compile(lambda x: x + 1, backend="eager")
    g(torch.ones(2)), g(torch.ones(2))
    assert clean.record()["recompiles"] == 0 and compilation.summary_line(clean.record()) is None


class Stream:
    def __init__(self, poisoned_step: int | None):
        self.position, self.poisoned_step = 0, poisoned_step

    def __next__(self) -> torch.Tensor:
        self.position += 1
        x = torch.randn(4, 8)
        if self.position == 2 * self.poisoned_step:  # the second micro-batch of that step
            x[0, 0] = float("inf")
        return x

    def seek(self, position: int) -> None:
        self.position = position


def train(tmp_path: Path, compiled: bool, poisoned_step: int | None = None) -> tuple[dict, list[dict]]:
    """The experiments' loop body over a two-group MLP (compiled with aot_eager: dynamo and AOTAutograd, no
    inductor), returning the row fields and the step log."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    pc = precision.get("fp32_baseline")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = precision.grad_scaler(pc, CPU)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    cfg = Cfg(str(tmp_path), log_every=1, eval_steps=4, diverge_patience=3, diagnostics_every=3)
    batches = Stream(poisoned_step)
    run = TrainingRun(model, optimizer, scheduler, scaler, cfg=cfg, pc=pc, seed=0, run_id="r", experiment="test",
                      device=CPU, world=distributed.SINGLE_PROCESS, batches=batches, data_fingerprint="d",
                      group_of=lambda name: "first" if name.startswith("0.") else "second")
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    while run.next_step():
        for micro in range(run.local_accumulation):
            run.seed_micro_batch(micro)
            with run.forward_backward():
                logits = forward(next(batches))
                loss = logits.square().mean() / run.local_accumulation
                scaler.scale(loss).backward()
            run.micro_batch(loss, logits, samples=4, flops=1.0)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        with run.optimizer_step():
            scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run.end_step(grad_norm, 1e-2, lambda: ({"score": 0.0}, None))
    log = [json.loads(line) for line in (tmp_path / "logs" / "r.jsonl").read_text().splitlines()]
    return run.finish(), [r for r in log if "eval" not in r]


def test_diagnostics_neither_recompile_nor_break_a_compiled_model_and_still_measure(tmp_path):
    """Measured steps (1, 4, 7) run eagerly; the others run one graph, compiled once on step 2, whose forward
    hooks still count a non-finite output (an inf fed on compiled step 5: both groups' outputs, one micro-batch;
    the run stays non-finite after it), step for step as the same run uncompiled counts them."""
    row, log = train(tmp_path / "compiled", compiled=True, poisoned_step=5)
    assert {k: row["compile"][k] for k in ("recompiles", "graph_breaks", "frames_run_eagerly", "fell_back",
                                           "last_compile_step")} == {
        "recompiles": 0, "graph_breaks": 0, "frames_run_eagerly": 0, "fell_back": False, "last_compile_step": 2}
    assert row["compile"]["graphs"] == 1
    measured = [r["step"] for r in log if "act_grad_dtypes" in r]
    assert measured == [1, 4, 7]  # activation gradients hooked on the eager steps (the second layer's input)
    first = next(r for r in log if r["nonfinite"]["outputs"] != {"first": 0, "second": 0})
    assert (first["step"], first["nonfinite"]["outputs"]) == (5, {"first": 1, "second": 1})
    assert first["nonfinite_origin"] == "forward:first"
    eager_row, eager_log = train(tmp_path / "eager", compiled=False, poisoned_step=5)
    assert eager_row["compile"]["frames_compiled"] == 0
    assert [r["nonfinite"] for r in eager_log] == [r["nonfinite"] for r in log]
    assert [r["loss"] for r in eager_log[:4]] == pytest.approx([r["loss"] for r in log[:4]], rel=1e-5)


# ------------------------------------------------------------------------ the real entry points, compiled

COMPILED_HERE = [name for name, pc in precision.REGISTRY.items()
                 if precision.should_compile(pc, CPU) and not precision.unsupported_reason(pc, CPU)]
# measured (eager) steps 1 and 6, compiled steps 2-5 and 7-8, evaluations at 4 and 8
STEPS = ["--max_steps", "8", "--eval_steps", "4", "--diagnostics_every", "5", "--log_every", "2",
         "--timing_warmup_steps", "2", "--threads", "1"]
LM_SMALL = ["--preset", "tiny", "--n_layer", "1", "--n_head", "1", "--n_embd", "64", "--block_size", "32",
            "--batch_size", "4", "--gradient_accumulation_steps", "2", "--eval_sequences", "16"]


def test_configs_that_compile_on_cpu_are_the_ones_the_registry_marks_compiled():
    assert COMPILED_HERE == ["bf16_sr_fp32_moments", "bf16_body_fp32_head"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    from experiments.lm import prepare_data as lm_prepare

    root = tmp_path_factory.mktemp("caches")
    return {"classification": tiny_run.small_cache(root / "classification"),
            "lm": lm_prepare.prepare("synthetic", root / "lm", tokenizer="bpe:512", val_fraction=0.1,
                                     synthetic_docs=60)}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["classification", "lm"])
@pytest.mark.parametrize("config", COMPILED_HERE)
def test_every_config_compiled_here_compiles_once_and_runs_compiled_to_the_end(caches, tmp_path, experiment, config):
    import subprocess
    import sys

    script = tiny_run.ROOT / "experiments" / experiment / "run.py"
    flags = (tiny_run.SMALL if experiment == "classification" else LM_SMALL) + STEPS
    proc = subprocess.run([sys.executable, str(script), *flags, "--config", config, "--data_dir",
                           str(caches[experiment]), "--output_dir", str(tmp_path)], env=tiny_run.ENV,
                          cwd=tiny_run.ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = tiny_run.rows(tmp_path)
    assert row["status"] == "completed" and row["compiled"] and row["evaluations"] == 2
    compiled = row["compile"]
    assert compiled["recompiles"] == 0, compiled["recompile_reasons"]
    assert (compiled["graph_breaks"], compiled["frames_run_eagerly"], compiled["fell_back"]) == (0, 0, False)
    assert compiled["graphs"] == 1 and compiled["last_compile_step"] == 2  # nothing later, evaluations included
    assert "Recompiling" not in proc.stderr and "recompile_limit" not in proc.stderr
    assert math.isfinite(row["samples_per_second"])
