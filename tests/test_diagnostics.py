"""Precision diagnostics: the fp32 shadow, memory accounting, and the real run.py at lr 2e-5 on the tiny preset.

The end-to-end tests assert on diagnostics measured in the run (step logs and rows), never on constants: bf16
round-to-nearest loses most of each update while stochastic rounding and fp32 land it; fp16_naive dies in the
optimizer while amp_fp16 completes; fp32 optimizer arithmetic over the same fp16 weights and gradients survives.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dtype_bench import checkpoint, optimizers, precision
from dtype_bench.adamw_state import stored_moments_fp32
from dtype_bench.diagnostics import PrecisionDiagnostics
from dtype_bench.nonfinite import count_nonfinite, count_nonfinite_state, group_roots
from dtype_bench.underflow import tiny_or_zero

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


class Toy(nn.Module):
    """embeddings -> encoder -> head, named like the classifier so `parameter_group_of` applies."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.body = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.LayerNorm(32))
        self.head = nn.Linear(32, 8)

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)).mean(1))


def toy_group(name: str) -> str:
    return {"embed": "embeddings", "body": "encoder", "head": "head"}[name.split(".")[0]]


def toy_step(model: Toy, optimizer, diag: PrecisionDiagnostics, step: int, ids: torch.Tensor, *,
             overflow: bool = False) -> dict:
    """One optimizer step as run.py takes it; returns the diagnostics fields the monitor logs for it.
    `overflow`: one gradient element of the head becomes inf and the update is skipped; recorded without loss
    scaling, so that gradient is the step's non-finite origin."""
    logits = model(ids)
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), torch.ones(len(ids), 8))
    loss.backward()
    if overflow:
        model.head.bias.grad[0] = float("inf")
    diag.before_step()
    if not overflow:
        optimizer.step()
    diag.after_step()
    optimizer.zero_grad(set_to_none=True)
    fields = diag.step_fields()
    fields.update(diag.nonfinite_record(step, diag.step_counts().tolist(), {"loss": int(not torch.isfinite(loss))},
                                        scaler_skips=False))
    return fields


def train_toy(dtype: torch.dtype, optimizer_cls, steps: int, lr: float, *, every: int = 1, poison=None):
    torch.manual_seed(0)
    model = Toy().to(dtype)
    optimizer = optimizer_cls(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    diag = PrecisionDiagnostics(model, optimizer, toy_group, every=every)
    records = []
    for step in range(1, steps + 1):
        if poison and step == poison[0]:
            poison[1](model)
        records.append(toy_step(model, optimizer, diag, step, torch.randint(0, 50, (4, 6))))
    return model, optimizer, diag, records


def test_shadow_adamw_is_torch_adamw_in_fp32():
    torch.manual_seed(0)
    weight, moments = torch.randn(64, 16), (torch.zeros(64, 16), torch.zeros(64, 16))
    param = nn.Parameter(weight.clone())
    ours = nn.Parameter(weight.clone())
    reference = torch.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    fp32_states = optimizers.AdamWFp32States([ours], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for step in range(1, 4):
        grad = torch.randn(64, 16)
        param.grad, ours.grad = grad.clone(), grad.clone()
        shadow, *moments = optimizers.adamw_fp32_step(param.detach(), grad, *moments, step, lr=1e-2, beta1=0.9,
                                                     beta2=0.99, eps=1e-8, weight_decay=0.1)
        reference.step()
        fp32_states.step()
        torch.testing.assert_close(shadow, param.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.detach(), param.detach(), rtol=1e-6, atol=1e-7)


def test_fidelity_is_one_in_fp32_and_drops_with_bf16_round_to_nearest():
    _, _, diag32, rec32 = train_toy(torch.float32, torch.optim.AdamW, 3, 1e-5)
    _, _, diag16, rec16 = train_toy(torch.bfloat16, torch.optim.AdamW, 3, 1e-5)
    for fields in rec32:
        assert all(abs(v - 1) < 1e-3 for v in fields["update_fidelity"].values()), fields
        assert all(v < 0.01 for v in fields["lost_update_frac"].values())
    assert set(rec16[0]["update_fidelity"]) == {"embeddings", "encoder", "head"}
    assert all(v < 0.9 for v in diag16.summary()["mean_update_fidelity"].values())
    assert all(v > 0.1 for v in rec16[-1]["lost_update_frac"].values())
    assert diag32.summary()["nonfinite_origin"] is None and diag32.measured_steps == 3


def test_sampling_every_k_steps():
    _, _, diag, records = train_toy(torch.float32, torch.optim.AdamW, 5, 1e-3, every=2)
    assert ["update_fidelity" in r for r in records] == [True, False, True, False, True]
    assert all(r["nonfinite_origin"] is None for r in records), "non-finite tracking runs every step"
    assert diag.measured_steps == 3


def test_nonfinite_origin_names_the_stage_and_group():
    def poison_encoder(model):
        with torch.no_grad():
            model.body[2].weight[0] = float("inf")  # LayerNorm scale: its output becomes non-finite

    *_, diag, records = train_toy(torch.float32, torch.optim.AdamW, 3, 1e-3, poison=(2, poison_encoder))
    assert records[0]["nonfinite_origin"] is None
    assert records[1]["nonfinite_origin"] == "forward:encoder"
    assert records[1]["nonfinite"]["outputs"]["embeddings"] == 0 and records[1]["nonfinite"]["outputs"]["encoder"] > 0
    assert diag.summary()["nonfinite_origin"] == "forward:encoder" and diag.summary()["nonfinite_origin_step"] == 2

    class NaNOnSecondStep(torch.optim.AdamW):  # an optimizer that writes NaN into the head's bias
        def step(self, closure=None):
            super().step(closure)
            if self.state[self.param_groups[0]["params"][-1]]["step"] == 2:
                self.param_groups[0]["params"][-1].data.fill_(float("nan"))

    *_, records = train_toy(torch.float32, NaNOnSecondStep, 3, 1e-3)
    assert [r["nonfinite_origin"] for r in records] == [None, "optimizer:head", "forward:head"]


def test_a_tensor_counts_once_when_it_holds_a_non_finite_value_and_large_finite_values_never():
    finfo16, finfo32 = torch.finfo(torch.float16), torch.finfo(torch.float32)
    finite = [torch.full((1000,), finfo16.max, dtype=torch.float16),  # an fp16 sum or norm of these is inf
              torch.full((4, 4), finfo32.min),  # an additive attention mask
              torch.empty(0)]
    nonfinite = [torch.tensor([1.0, float("nan"), float("inf")]), torch.tensor([float("-inf")], dtype=torch.bfloat16),
                 torch.tensor([float("nan")], dtype=torch.float16)]
    assert count_nonfinite(finite, CPU).item() == 0
    assert count_nonfinite(finite + nonfinite, CPU).item() == 3
    assert count_nonfinite([], CPU).item() == 0


def test_gradients_and_weights_are_counted_without_a_copy_and_large_finite_values_never():
    """fp16 values at fp16's max (an fp16 sum of them is inf) and fp32 weights of 1e30 are finite; each tensor with
    a NaN or inf counts once. No op allocates a tensor of the inputs' size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    finfo16 = torch.finfo(torch.float16)
    finite = [torch.full((1000,), finfo16.max, dtype=torch.float16), torch.full((1000,), 1e30), torch.empty(0),
              torch.full((1000,), -3e38, dtype=torch.bfloat16)[:1]]
    nonfinite = [torch.tensor([1.0, float("nan"), float("inf")]), torch.tensor([float("-inf")], dtype=torch.bfloat16),
                 torch.tensor([float("nan")], dtype=torch.float16)]

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    with Largest():
        assert count_nonfinite_state(finite, CPU).item() == 0
        assert count_nonfinite_state(finite + nonfinite, CPU).item() == 3
    assert Largest.largest <= len(finite + nonfinite)  # per-tensor norms and their stack, nothing the inputs' size
    assert count_nonfinite_state([], CPU).item() == 0


def test_resumed_diagnostics_report_what_an_uninterrupted_run_reports(tmp_path):
    """Interrupted after step 3 of 6 and resumed the way run.py resumes: the state goes through a real checkpoint
    (torch.load with weights_only) and the new PrecisionDiagnostics is built on the freshly initialised model,
    before the checkpoint is restored. The first non-finite origin (step 2), the fidelity of measured steps 1
    and 3 (5 comes after the resume), the static memory and the drift from the initial weights all span it."""
    batches = [torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(s)) for s in range(6)]

    def build():
        torch.manual_seed(0)
        model = Toy()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        return model, optimizer, PrecisionDiagnostics(model, optimizer, toy_group, every=2)

    def train(model, optimizer, diag, steps) -> list[dict]:
        return [toy_step(model, optimizer, diag, step, batches[step - 1], overflow=step == 2) for step in steps]

    def checkpoints(model):
        return checkpoint.RunCheckpoints(tmp_path, model, {"run_id": "toy"})

    def schedule_and_scaler(optimizer):  # the rest of what a checkpoint holds; constant here
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), torch.amp.GradScaler("cpu", enabled=False)

    def restore(model, optimizer):
        return checkpoints(model).restore(optimizer, *schedule_and_scaler(optimizer))

    model, optimizer, uninterrupted = build()
    expected = train(model, optimizer, uninterrupted, range(1, 7))

    model, optimizer, diag = build()
    train(model, optimizer, diag, range(1, 4))
    state = diag.state_dict()
    assert json.loads(json.dumps(state)) == state
    checkpoints(model).save(optimizer, *schedule_and_scaler(optimizer), progress={"step": 3, "diagnostics": state},
                            best_dir=None)
    del model, optimizer, diag

    model, optimizer, resumed = build()
    resumed.load_state_dict(restore(model, optimizer)["diagnostics"])
    assert train(model, optimizer, resumed, range(4, 7)) == expected[3:]
    summary = resumed.summary()
    assert summary == uninterrupted.summary() and resumed.weight_drift() == uninterrupted.weight_drift()
    assert (summary["nonfinite_origin"], summary["nonfinite_origin_step"]) == ("backward:head", 2)
    assert summary["diagnostics_measured_steps"] == 3 and summary["static_memory_bytes"]["optimizer_state"]
    assert all(0 < v < 0.5 for v in resumed.weight_drift().values())

    # built on the restored (trained) weights, it would measure drift from the wrong start: refused
    model, optimizer, _ = build()
    progress = restore(model, optimizer)
    with pytest.raises(ValueError, match="other initial weights"):
        PrecisionDiagnostics(model, optimizer, toy_group, every=2).load_state_dict(progress["diagnostics"])


def test_group_roots_are_the_outermost_single_group_modules():
    from experiments.classification import model as model_lib

    encoder = model_lib.build_encoder("tiny", vocab_size=100, pad_token_id=1, max_length=16, tiny_layers=1,
                                      tiny_hidden=64)
    model = model_lib.MultiLabelClassifier(encoder, 5, 0.0, precision.head_autocast(precision.get("fp32_baseline"),
                                                                                   torch.device("cpu")))
    roots = group_roots(model, model_lib.parameter_group_of)
    assert [(g, type(m).__name__) for g, m in roots] == [
        ("embeddings", "RobertaEmbeddings"), ("encoder", "RobertaEncoder"), ("head", "Linear")]


def test_underflow_counts_zero_and_subnormal_in_the_tensors_own_dtype():
    x = torch.tensor([0.0, 1e-6, 1e-3, float("nan")])
    assert tiny_or_zero(x.half()).tolist() == [True, True, False, False]  # 1e-6 is subnormal in fp16
    assert tiny_or_zero(x).tolist() == [True, False, False, False]


def test_static_memory_counts_real_8bit_state_and_which_params_got_it():
    pc = precision.get("amp_bf16_8bit_adam")
    model = Toy()
    model.body.append(nn.Linear(32, 256))  # >= 4,096 elements: bitsandbytes gives it 8-bit state
    model.head = nn.Linear(256, 8)
    optimizer = optimizers.build_optimizer(pc, [{"params": list(model.parameters())}], lr=1e-3, betas=(0.9, 0.999),
                                          eps=1e-8, weight_decay=0.0, device=CPU)
    diag = PrecisionDiagnostics(model, optimizer, toy_group, every=1)
    model(torch.randint(0, 50, (4, 6))).sum().backward()
    diag.before_step()
    optimizer.step()
    diag.after_step()
    # the encoder's fp32 leftovers (biases, LayerNorm, the small Linear) would speak for its 8-bit matrix
    assert list(diag.step_fields()["second_moment_underflow_frac"]) == ["embeddings", "head"]
    summary = diag.summary()
    assert summary["optimizer_8bit_params"]["encoder"] == ["body.3.weight"]
    assert summary["optimizer_8bit_params"]["head"] == []
    big = model.body[3].weight.numel()
    state = summary["static_memory_bytes"]["optimizer_state"]
    # 2 uint8 moments for the big matrix (+ block scales) vs 2 fp32 moments for the rest
    small = sum(p.numel() for p in model.parameters()) - big
    assert 2 * big <= state["total"] - 8 * small < 2 * big * 1.2
    assert summary["static_memory_bytes"]["weights"]["total"] == 4 * sum(p.numel() for p in model.parameters())
    # the shadow reads the dequantized 8-bit state: the fp32-master update lands as computed
    assert abs(summary["mean_update_fidelity"]["encoder"] - 1) < 1e-3


def test_fp8_converts_encoder_linears_only():
    pytest.importorskip("torchao.float8")
    from experiments.classification import model as model_lib

    pc = precision.get("amp_bf16_fp8")
    encoder = model_lib.build_encoder("tiny", vocab_size=100, pad_token_id=1, max_length=16, tiny_layers=1,
                                      tiny_hidden=64)
    model = model_lib.MultiLabelClassifier(encoder, 4271, 0.0, precision.head_autocast(pc, torch.device("cpu")))
    precision.cast_model(model.encoder, model.head, pc)
    kinds = {type(m).__name__ for m in model.encoder.modules()}
    assert "Float8Linear" in kinds and "Linear" not in kinds
    assert type(model.head) is nn.Linear
    assert precision.unsupported_reason(pc, CPU).startswith("float8 training needs a CUDA GPU")


# ---------------------------------------------------------------- the real run.py, lr 2e-5, tiny preset

# Small where the mechanisms do not depend on size (per-element rounding and underflow): 1 layer x 64 hidden.
SMALL = ["--preset", "tiny", "--tiny_layers", "1", "--tiny_hidden", "64", "--max_length", "32", "--batch_size", "4",
         "--gradient_accumulation_steps", "2", "--learning_rate", "2e-5", "--warmup_ratio", "0", "--log_every", "1",
         "--eval_steps", "100", "--max_eval_docs", "8", "--eval_batch_size", "8", "--timing_warmup_steps", "0",
         "--diagnostics_every", "1", "--diverge_patience", "1", "--max_steps", "2", "--threads", "1"]


RUN_CONFIGS = ("fp32_baseline", "bf16_naive", "bf16_no_compile", "bf16_sr_bf16_moments", "amp_fp16",
               "amp_fp16_no_loss_scaling", "fp16_naive", "fp16_fp32_adam_states")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One in-process run.py per config into one output dir; returns {config: (row, step-log lines)}."""
    from experiments.classification.prepare_data import prepare_tiny
    from experiments.classification.run import main

    cache = prepare_tiny(tmp_path_factory.mktemp("cache") / "tiny")
    out = tmp_path_factory.mktemp("runs")
    two_threads = tmp_path_factory.mktemp("two_threads")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        for config in RUN_CONFIGS:
            main([*SMALL, "--config", config, "--data_dir", str(cache), "--output_dir", str(out)])
        # fp32 again at 2 threads: a different reduction order (the underflow fields must not depend on it)
        main([*SMALL, "--threads", "2", "--config", "fp32_baseline", "--data_dir", str(cache), "--output_dir",
              str(two_threads)])

    def read(folder):
        rows = {r["config"]: r for r in map(json.loads, (folder / "results.jsonl").read_text().splitlines())}
        return {c: (r, [json.loads(line) for line in (folder / "logs" / f"{r['run_id']}.jsonl").read_text()
                        .splitlines()]) for c, r in rows.items()}

    return {**read(out), "fp32_baseline@2threads": read(two_threads)["fp32_baseline"]}


def measured(log: list[dict], key: str) -> list[dict]:
    return [r[key] for r in log if key in r]


def zero_or_subnormal(log: list[dict], prefix: str) -> list[dict]:
    """Per measured step and group: exact zeros inside live rows plus subnormals (of `prefix` grad / act_grad)."""
    return [{g: z[g] + s[g] for g in z} for z, s in zip(measured(log, f"{prefix}_zero_in_live_rows_frac"),
                                                       measured(log, f"{prefix}_subnormal_frac"))]


def test_bf16_round_to_nearest_loses_most_of_each_update(runs):
    """bf16_sr_fp32_moments' numerics are run through bf16_no_compile: the same weights and optimizer, without
    torch.compile of the model (minutes of compilation on a 2-core CPU)."""
    def numerics(name: str) -> dict:
        return {k: v for k, v in precision.get(name).to_record().items() if k not in ("name", "description", "compile")}

    assert numerics("bf16_sr_fp32_moments") == numerics("bf16_no_compile")
    fidelity = {c: runs[c][0]["mean_update_fidelity"] for c in ("fp32_baseline", "bf16_no_compile", "bf16_naive")}
    for group in ("embeddings", "encoder", "head"):
        assert abs(fidelity["fp32_baseline"][group] - 1) < 1e-3, fidelity
        assert abs(fidelity["bf16_no_compile"][group] - 1) < 0.2, fidelity  # unbiased, noisy per step
        assert fidelity["bf16_naive"][group] < 0.6, fidelity
    naive_lost = measured(runs["bf16_naive"][1], "lost_update_frac")
    pure_lost = measured(runs["bf16_no_compile"][1], "lost_update_frac")
    assert min(s["encoder"] for s in naive_lost) > 0.5  # most elements do not move at all
    assert all(s["encoder"] < 0.01 for s in measured(runs["fp32_baseline"][1], "lost_update_frac"))
    assert len(naive_lost) == len(pure_lost) == 2


def test_fp16_naive_diverges_in_the_optimizer_while_amp_fp16_completes(runs):
    naive, log = runs["fp16_naive"]
    assert naive["status"] == "diverged"
    assert naive["nonfinite_origin"].startswith("optimizer:") and naive["nonfinite_origin_step"] == 1
    first = log[0]
    assert first["nonfinite_origin"].startswith("optimizer:") and math.isfinite(first["loss"])
    assert sum(first["nonfinite"]["grads"].values()) == 0, "gradients were finite: the update made the NaN"
    # the mechanism: fp16 second moments underflow (to zero / subnormal)
    assert first["second_moment_underflow_frac"]["head"] > 0.5
    amp = runs["amp_fp16"][0]
    assert amp["status"] == "completed" and amp["nonfinite_origin"] is None


def test_fp32_optimizer_arithmetic_over_fp16_weights_tells_the_mechanisms_apart(runs):
    """Same fp16 weights and fp16 gradients as fp16_naive (their underflow is still there), only the optimizer
    arithmetic moved to fp32: the run stays finite, so fp16_naive's divergence is the optimizer's."""
    row, log = runs["fp16_fp32_adam_states"]
    naive_log = runs["fp16_naive"][1]
    grads = zero_or_subnormal(log, "grad")[0]
    assert row["status"] == "completed" and row["nonfinite_origin"] is None
    # the gradient mechanism is shared: the same fraction of fp16 gradient elements is zero or subnormal
    assert grads["head"] == pytest.approx(zero_or_subnormal(naive_log, "grad")[0]["head"], abs=1e-3)
    assert grads["head"] > 0.1
    # the optimizer mechanism is not: fp16 second moments underflow beyond the gradients, fp32 ones do not
    naive_second = measured(naive_log, "second_moment_underflow_frac")[0]
    own_second = measured(log, "second_moment_underflow_frac")[0]
    for group in ("encoder", "head"):
        assert own_second[group] <= grads[group] < naive_second[group], (group, grads, own_second, naive_second)
    assert row["dtypes"]["body_params"] == ["float16"] and row["dtypes"]["optimizer_state"]["exp_avg"] == ["float32"]


def test_rows_record_the_checked_loss_scaling_loss_dtype_tf32_and_eval_dtypes(runs):
    scaled, unscaled, naive = (runs[c][0] for c in ("amp_fp16", "amp_fp16_no_loss_scaling", "bf16_naive"))
    assert scaled["dtypes"]["loss_scaling"] == {"enabled": True, "scaled": True}
    assert unscaled["dtypes"]["loss_scaling"] == {"enabled": False, "scaled": False}
    assert {r["dtypes"]["loss"] for r in (scaled, unscaled, naive)} == {"float32"}
    assert naive["dtypes"]["tf32"] == {"cuda_matmul": False, "cudnn_conv": False, "mkldnn_matmul": False}
    # evaluation under the config's precision, checked on its first batch
    assert scaled["eval_dtypes"]["logits"] == "float16" and scaled["eval_dtypes"]["loss"] == "float32"
    assert naive["eval_dtypes"]["body_params"] == ["bfloat16"] and naive["eval_dtypes"]["logits"] == "bfloat16"


def test_row_records_eval_precision_memory_and_drift(runs):
    row, log = runs["fp32_baseline"]
    assert row["eval_precision"] == "config" and row["diagnostics_measured_steps"] == 2
    static = row["static_memory_bytes"]
    assert static["weights"]["total"] == static["grads"]["total"] > 0
    assert static["optimizer_state"]["total"] >= 2 * static["weights"]["total"]
    assert row["train_peak_memory_gb"] > 0 and row["peak_memory_gb"] >= row["train_peak_memory_gb"]
    drift = [r["weight_drift"] for r in log if r.get("eval") == "validation"]
    assert drift and all(0 < v < 0.01 for v in drift[-1].values())


def test_moment_diagnostic_is_nonzero_exactly_for_low_precision_round_to_nearest_moments(runs):
    """Measured in the real run.py (step 2: the first step with stored moments): a bf16 second moment rounded to
    nearest drops changes the fp32 recurrence makes, whatever the weight rounding; fp32 moments never do."""
    def second_moment_lost(config: str) -> dict:
        (fields,) = measured(runs[config][1], "moment_update_lost_frac")  # step 1 has no stored moments yet
        return fields["exp_avg_sq"]

    for config in ("bf16_naive", "bf16_sr_bf16_moments"):
        assert all(v > 0.001 for v in second_moment_lost(config).values()), (config, second_moment_lost(config))
    for config in ("fp32_baseline", "bf16_no_compile", "amp_fp16", "fp16_fp32_adam_states"):
        lost = measured(runs[config][1], "moment_update_lost_frac")[0]
        assert all(v == 0 for role in lost.values() for v in role.values()), (config, lost)
    row = runs["bf16_sr_bf16_moments"][0]
    assert row["precision"]["exp_avg_sq_dtype"] == "bfloat16" and row["precision"]["weight_update_rounding"] == "stochastic"
    assert row["dtypes"]["optimizer_state"]["exp_avg_sq"] == ["bfloat16"]


@pytest.mark.parametrize("name, decays", [("fp32_baseline", True), ("bf16_no_compile", True),
                                          ("bf16_naive", False), ("bf16_sr_bf16_moments", False)])
def test_second_moment_decays_under_zero_gradients_unless_it_is_bf16_rounded_to_nearest(name, decays):
    """The issue's measurement: after 300 zero-gradient steps an fp32 second moment is 0.999^300 = 0.74 of what it
    was; a bf16 one rounded to nearest has not changed in a single element, and the diagnostic says so each step."""
    torch.manual_seed(0)
    pc = precision.get(name)
    layer = nn.Linear(64, 64, bias=False).to(pc.weight_dtype)
    optimizer = optimizers.build_optimizer(pc, [{"params": list(layer.parameters())}], lr=1e-3, betas=(0.9, 0.999),
                                          eps=1e-8, weight_decay=0.0, device=CPU)
    for _ in range(10):  # moments of ordinary gradients first
        layer.weight.grad = torch.randn_like(layer.weight)
        optimizer.step()
    second = lambda: optimizer.state[layer.weight]["exp_avg_sq"].float().clone()  # noqa: E731
    start = second()
    diag = PrecisionDiagnostics(layer, optimizer, lambda name: "encoder", every=1)
    lost = []
    for _ in range(300):
        layer.weight.grad = torch.zeros_like(layer.weight)
        diag.before_step()
        optimizer.step()
        diag.after_step()
        lost.append(diag.step_fields()["moment_update_lost_frac"]["exp_avg_sq"]["encoder"])
    ratio = second() / start
    if decays:
        assert ratio.median().item() == pytest.approx(0.999**300, rel=1e-3) and max(lost) == 0
    else:
        assert torch.equal(ratio, torch.ones_like(ratio)) and min(lost) == 1.0


@pytest.mark.parametrize("name, eight_bit", [("amp_bf16_8bit_adam", True), ("amp_bf16", False)])
def test_8bit_second_moments_decay_by_block_and_lose_changes_below_their_code_spacing(name, eight_bit):
    """bitsandbytes' 8-bit codes, read dequantized: under zero gradients a block's scale decays with it, so nothing
    is lost (unlike bf16 rounded to nearest); when the largest element of each block decays while the others
    should grow by 0.3%, an element keeps its code and follows its block's scale down. The reference is the
    dequantized state itself: an element that moved down when the fp32 recurrence moves it up is certainly lost."""
    torch.manual_seed(0)
    layer = nn.Linear(128, 256, bias=False)  # 32,768 elements >= 4,096: bitsandbytes keeps its state in 8 bits
    optimizer = optimizers.build_optimizer(precision.get(name), [{"params": [layer.weight]}], lr=1e-3,
                                          betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, device=CPU)
    for _ in range(10):
        layer.weight.grad = torch.randn_like(layer.weight)
        optimizer.step()
    assert (optimizer.state[layer.weight]["state2" if eight_bit else "exp_avg_sq"].dtype
            == (torch.uint8 if eight_bit else torch.float32))
    second = lambda: stored_moments_fp32(optimizer.state[layer.weight], layer.weight)["exp_avg_sq"].flatten()  # noqa: E731
    diag = PrecisionDiagnostics(layer, optimizer, lambda name: "encoder", every=1)

    def step(grad: torch.Tensor) -> float:
        layer.weight.grad = grad
        diag.before_step()
        optimizer.step()
        diag.after_step()
        return diag.step_fields()["moment_update_lost_frac"]["exp_avg_sq"]["encoder"]

    start = second().clone()
    lost = [step(torch.zeros_like(layer.weight)) for _ in range(50)]
    assert (second() / start).median().item() == pytest.approx(0.999**50, rel=1e-4) and max(lost) == 0

    blocks = second().view(-1, 256).clone()  # bitsandbytes' blocks: 256 consecutive elements
    grad_sq = 4 * blocks  # fp32: v -> 0.999 v + 0.001 * 4 v = 1.003 v
    grad_sq[torch.arange(len(blocks)), blocks.argmax(1)] = 0  # each block's largest element decays by 0.1%
    before = second().clone()
    lost_frac = step(grad_sq.sqrt().view_as(layer.weight))
    moved_down = ((second() < before) & (grad_sq.flatten() > 0)).float().mean().item()
    if eight_bit:
        assert moved_down > 0.5 and lost_frac >= moved_down
    else:
        assert moved_down == 0 and lost_frac == 0


def test_fp32_reads_zero_in_every_underflow_and_subnormal_field_at_1_and_2_threads(runs):
    """Every step-log field named underflow or subnormal is exactly 0 for fp32_baseline, whatever the thread count
    (reduction order): exact zeros inside live rows are counted apart (`*_zero_in_live_rows_frac`: fp32 has some,
    and they are no underflow), and the second moment leaves out the rows of tokens never seen."""
    for name in ("fp32_baseline", "fp32_baseline@2threads"):
        row, log = runs[name]
        assert row["env"]["torch_threads"] == (2 if name.endswith("2threads") else 1)
        fields = {k for rec in log for k in rec if "underflow" in k or "subnormal" in k}
        assert {"grad_subnormal_frac", "act_grad_subnormal_frac", "second_moment_underflow_frac"} <= fields
        for key in fields:
            values = measured(log, key)
            assert len(values) == 2 and all(v == 0 for step in values for v in step.values()), (name, key, values)
    structural = measured(runs["fp32_baseline"][1], "grad_structural_zero_frac")[0]
    assert structural["embeddings"] > 0.5 and structural["head"] == 0  # absent tokens' rows: not underflow


def test_fp16_moments_underflow_against_their_fp32_recurrence_and_fp32_moments_do_not(runs):
    """second_moment_underflow_frac counts elements whose fp32 recurrence is a normal number that the stored
    moment holds as zero or subnormal: most of fp16_naive's (grad^2 ~ 1e-11 is below fp16's subnormals), none of
    fp16_fp32_adam_states' (same fp16 gradients, fp32 moments)."""
    naive = measured(runs["fp16_naive"][1], "second_moment_underflow_frac")[0]
    fp32_moments = measured(runs["fp16_fp32_adam_states"][1], "second_moment_underflow_frac")[0]
    assert naive["encoder"] > 0.5 and all(v == 0 for v in fp32_moments.values()), (naive, fp32_moments)


def test_activation_gradients_are_judged_in_the_dtype_of_the_matmul_that_consumes_them(runs):
    """Under fp16 autocast the fp32 LayerNorm outputs feeding q/k/v and the head get their gradients from fp16
    matmuls: they are judged against fp16's smallest normal (the head group included), not fp32's."""
    dtypes = measured(runs["amp_fp16_no_loss_scaling"][1], "act_grad_dtypes")[0]
    assert dtypes["encoder"] == ["float16"] and dtypes["head"] == ["float16"], dtypes
    assert measured(runs["fp32_baseline"][1], "act_grad_dtypes")[0]["head"] == ["float32"]
    head = measured(runs["amp_fp16_no_loss_scaling"][1], "act_grad_subnormal_frac")
    assert max(step["head"] for step in head) > 0, head


def test_loss_scaling_keeps_fp16_activation_gradients_from_underflowing(runs):
    """The gradients entering the encoder's matmul layers during backward, with the loss scale applied, judged in
    fp16 (the dtype of the matmuls that produce them). Without scaling all of them are zero or below fp16's
    smallest normal (measured here: 100%); with GradScaler's 2^16 most are normal (measured 15-17% still below:
    the gradients of the LayerNorm outputs feeding q/k/v at positions that reach the loss only through keys and
    values)."""
    unscaled = zero_or_subnormal(runs["amp_fp16_no_loss_scaling"][1], "act_grad")
    scaled = zero_or_subnormal(runs["amp_fp16"][1], "act_grad")
    assert "float16" in measured(runs["amp_fp16"][1], "act_grad_dtypes")[0]["encoder"]
    assert len(unscaled) == len(scaled) == 2
    for without, with_scaling in zip(unscaled, scaled):
        assert without["encoder"] > 0.9 and with_scaling["encoder"] < without["encoder"] / 3, (unscaled, scaled)
    assert runs["amp_fp16_no_loss_scaling"][0]["status"] == "completed"
