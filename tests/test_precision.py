"""Precision semantics of every registry config: what each one allocates, computes and skips."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "classification"))

import model as model_lib  # noqa: E402
from dtype_bench import precision  # noqa: E402

CPU = torch.device("cpu")
NUM_LABELS = 40


def tiny_classifier(pc: precision.PrecisionConfig) -> model_lib.MultiLabelClassifier:
    torch.manual_seed(0)
    encoder = model_lib.build_encoder("tiny", vocab_size=300, pad_token_id=1, max_length=32, tiny_layers=1,
                                      tiny_hidden=64)
    model = model_lib.MultiLabelClassifier(encoder, NUM_LABELS, 0.0, pc, "cpu")
    precision.cast_model(model.encoder, model.head, pc)
    return model


def one_step(pc: precision.PrecisionConfig):
    """Build, run one optimizer step through the same calls run.py makes; return what was allocated."""
    model = tiny_classifier(pc)
    optimizer = precision.build_optimizer(pc, model_lib.param_groups(model, 0.01), lr=1e-3, betas=(0.9, 0.999),
                                          eps=1e-8, weight_decay=0.01, device=CPU)
    scaler = precision.grad_scaler(pc, CPU)
    ids = torch.randint(3, 300, (4, 16))
    targets = (torch.rand(4, NUM_LABELS) < 0.1).float()
    with precision.autocast(pc, CPU):
        logits = model(ids, torch.ones_like(ids))
    loss = model_lib.bce_loss_fp32(logits, targets)
    scaler.scale(loss).backward()
    grads = {n: p.grad.dtype for n, p in model.named_parameters()}
    scaler.step(optimizer)
    scaler.update()
    return model, optimizer, scaler, logits, loss, grads


RUNNABLE_ON_CPU = [name for name, pc in precision.REGISTRY.items() if precision.unsupported_reason(pc, CPU) is None]


@pytest.mark.parametrize("name", RUNNABLE_ON_CPU)
def test_every_cpu_config_allocates_what_it_declares(name):
    pc = precision.REGISTRY[name]
    model, optimizer, scaler, logits, loss, grads = one_step(pc)
    record = precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer)
    assert loss.dtype == torch.float32, "BCE is computed in fp32 for every config"
    assert record["body_params"] == [precision.dtype_name(pc.weight_dtype)]
    assert {grads[n] for n in grads if not n.startswith("head.")} == {pc.weight_dtype}
    assert {grads[n] for n in grads if n.startswith("head.")} == {pc.head_dtype}
    assert scaler.is_enabled() == (pc.loss_scaling == "dynamic")
    assert torch.isfinite(loss)


def test_autocast_configs_compute_in_low_precision_but_keep_fp32_masters():
    for name, low in (("amp_bf16", torch.bfloat16), ("amp_fp16", torch.float16)):
        model, optimizer, _, logits, _, _ = one_step(precision.REGISTRY[name])
        assert logits.dtype == low
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())


def test_fp32_head_configs_give_fp32_logits_and_head():
    _, _, _, logits, _, grads = one_step(precision.REGISTRY["amp_bf16_fp32_head"])
    assert logits.dtype == torch.float32
    model, _, _, logits, _, grads = one_step(precision.REGISTRY["bf16_body_fp32_head"])
    assert logits.dtype == torch.float32 and model.head.weight.dtype == torch.float32
    assert model.encoder.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert grads["head.weight"] == torch.float32


def test_naive_configs_keep_optimizer_state_in_low_precision():
    for name, low in (("fp16_naive", torch.float16), ("bf16_naive", torch.bfloat16)):
        _, optimizer, *_ = one_step(precision.REGISTRY[name])
        assert {s["exp_avg_sq"].dtype for s in optimizer.state.values()} == {low}


def test_fp16_naive_safe_eps_only_changes_eps():
    naive, safe = precision.REGISTRY["fp16_naive"], precision.REGISTRY["fp16_naive_safe_eps"]
    assert torch.tensor(1e-8, dtype=torch.float16).item() == 0.0, "the default eps vanishes in fp16"
    assert torch.tensor(safe.adam_eps, dtype=torch.float16).item() > 0
    differing = {k for k, v in naive.to_record().items() if safe.to_record()[k] != v}
    assert differing == {"name", "description", "adam_eps"}


def test_bf16_pure_uses_stochastic_rounding_optimizer():
    from torchao.optim import _AdamW

    _, optimizer, *_ = one_step(precision.REGISTRY["bf16_pure"])
    assert isinstance(optimizer, _AdamW) and optimizer.bf16_stochastic_round
    assert precision.REGISTRY["bf16_pure"].compile is True
    assert precision.REGISTRY["bf16_no_compile"].compile is False


def test_8bit_optimizer_allocates_uint8_state_for_large_tensors_only():
    model, optimizer, *_ = one_step(precision.REGISTRY["amp_bf16_8bit_adam"])
    # bitsandbytes keeps 32-bit state for tensors under 4,096 elements (its min_8bit_size)
    for param in model.parameters():
        expected = torch.uint8 if param.numel() >= 4096 else torch.float32
        assert optimizer.state[param]["state1"].dtype == expected, tuple(param.shape)
    assert model.encoder.embeddings.word_embeddings.weight.numel() >= 4096


def test_check_dtypes_fails_loudly_on_a_mismatch():
    pc = precision.REGISTRY["amp_bf16"]
    model, optimizer, _, logits, *_ = one_step(pc)
    model.head.to(torch.float16)
    with pytest.raises(precision.PrecisionMismatch, match="head params"):
        precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer)


@pytest.mark.parametrize("name, needle", [("fp32_tf32_matmul", "TF32"), ("amp_bf16_fp8", "float8")])
def test_gpu_only_configs_are_skipped_on_cpu_with_a_reason(name, needle):
    reason = precision.unsupported_reason(precision.REGISTRY[name], CPU)
    assert reason and needle in reason and "cpu" in reason


def test_config_names_resolve_and_unknown_ones_list_the_valid_names():
    assert precision.resolve_names("core") == ["fp32_baseline", "amp_fp16", "amp_bf16", "bf16_pure"]
    assert precision.resolve_names("all") == list(precision.REGISTRY)
    assert precision.resolve_names("amp_bf16,fp32_baseline") == ["amp_bf16", "fp32_baseline"]
    with pytest.raises(precision.UnknownConfig) as err:
        precision.resolve_names("amp_bf17")
    assert "amp_bf17" in str(err.value) and "fp32_baseline" in str(err.value)


def test_tf32_is_an_explicit_setting_of_every_run():
    precision.apply_matmul_precision(precision.REGISTRY["fp32_tf32_matmul"])
    assert torch.get_float32_matmul_precision() == "high"
    precision.apply_matmul_precision(precision.REGISTRY["fp32_baseline"])
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_registry_rejects_inconsistent_configs():
    with pytest.raises(ValueError, match="GradScaler"):
        precision.PrecisionConfig("x", "x", weight_dtype=torch.float16, loss_scaling="dynamic")
    with pytest.raises(ValueError, match="stochastic"):
        precision.PrecisionConfig("x", "x", optimizer="adamw_stochastic_rounding")


def test_naive_configs_do_their_update_arithmetic_in_the_weight_dtype():
    """Fused AdamW computes in fp32 internally; the naive configs must not get it (they would stop being naive)."""
    for name in ("fp16_naive", "bf16_naive"):
        _, optimizer, *_ = one_step(precision.REGISTRY[name])
        assert not optimizer.defaults["fused"]
    _, optimizer, *_ = one_step(precision.REGISTRY["fp32_baseline"])
    assert optimizer.defaults["fused"]
    # the mechanism: eps = 1e-8 vanishes in fp16 arithmetic, so a zero gradient gives 0 / 0
    zero = torch.zeros(1, dtype=torch.float16)
    assert torch.isnan(zero / (zero.sqrt() + torch.tensor(1e-8, dtype=torch.float16))).all()
