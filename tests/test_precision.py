"""Precision semantics of every registry config: what each one allocates, computes and skips."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch


from experiments.classification import model as model_lib
from dtype_bench import optimizers, precision

CPU = torch.device("cpu")
NUM_LABELS = 40


def tiny_classifier(pc: precision.PrecisionConfig) -> model_lib.MultiLabelClassifier:
    torch.manual_seed(0)
    encoder = model_lib.build_encoder("tiny", vocab_size=300, pad_token_id=1, max_length=32, tiny_layers=1,
                                      tiny_hidden=64)
    model = model_lib.MultiLabelClassifier(encoder, NUM_LABELS, 0.0, precision.head_autocast(pc, CPU))
    precision.cast_model(model.encoder, model.head, pc)
    return model


def one_step(pc: precision.PrecisionConfig):
    """Build, run one optimizer step through the same calls run.py makes; return what was allocated."""
    precision.apply_matmul_precision(pc)
    model = tiny_classifier(pc)
    optimizer = optimizers.build_optimizer(pc, model_lib.param_groups(model, 0.01), lr=1e-3, betas=(0.9, 0.999),
                                          eps=1e-8, weight_decay=0.01, device=CPU)
    scaler = precision.grad_scaler(pc, CPU)
    ids = torch.randint(3, 300, (4, 16))
    targets = (torch.rand(4, NUM_LABELS) < 0.1).float()
    with precision.autocast(pc, CPU):
        logits = model(ids, torch.ones_like(ids))
    loss = model_lib.bce_loss(logits, targets, pc.loss_dtype)
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


def test_fp16_naive_makes_nan_from_zero_gradients_and_safe_eps_or_fp32_states_do_not():
    """The mechanism the three fp16 configs separate, on one real step: fp16 AdamW arithmetic turns eps = 1e-8
    into 0, so elements with a zero gradient (embedding rows of absent tokens) get 0 / 0; eps = 1e-4 or fp32
    moments and arithmetic avoid it. The configs differ only where their names say."""
    naive, safe, fp32_states = (precision.REGISTRY[n] for n in
                                ("fp16_naive", "fp16_naive_safe_eps", "fp16_fp32_adam_states"))
    differing = lambda a, b: {k for k, v in a.to_record().items() if b.to_record()[k] != v}  # noqa: E731
    assert differing(naive, safe) == {"name", "description", "adam_eps"}
    assert differing(naive, fp32_states) == {"name", "description", "optimizer", "exp_avg_dtype", "exp_avg_sq_dtype"}
    model, *_ = one_step(naive)
    embeddings = model.encoder.embeddings.word_embeddings.weight
    assert torch.isnan(embeddings).any() and not torch.isnan(model.head.weight).any()
    for pc in (safe, fp32_states):
        model, *_ = one_step(pc)
        assert all(torch.isfinite(p).all() for p in model.parameters()), pc.name


@pytest.mark.parametrize("name, optimizer_type, moments", [
    ("bf16_sr_fp32_moments", "AdamWFp32States", torch.float32),
    ("bf16_sr_bf16_moments", "EagerAdamW", torch.bfloat16),
    ("bf16_kahan_bf16_moments", "AdamW", torch.bfloat16),
])
def test_bf16_update_variants_build_the_optimizer_their_fields_name(name, optimizer_type, moments):
    pc = precision.REGISTRY[name]
    model, optimizer, *_ = one_step(pc)
    assert type(optimizer).__name__ == optimizer_type
    assert precision.weight_update_rounding_of(optimizer) == pc.weight_update_rounding
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {moments}
    assert {s["exp_avg_sq"].dtype for s in optimizer.state.values()} == {moments}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_compile_false_compiles_nothing_not_even_torchaos_optimizer_step():
    """torchao's AdamW torch.compiles its per-parameter step by itself; a config that says compile=False must run
    it eagerly (counted by dynamo: no frame compiled)."""
    from torch._dynamo.utils import counters

    pc = dataclasses.replace(precision.REGISTRY["bf16_sr_bf16_moments"], compile=False)
    assert not optimizers.compiles_optimizer_step(pc, CPU)
    counters.clear()
    _, optimizer, *_ = one_step(pc)
    assert optimizer.state, "the step ran"
    assert sum(counters["frames"].values()) == 0, dict(counters["frames"])
    assert optimizers.compiles_optimizer_step(precision.REGISTRY["bf16_sr_bf16_moments"], torch.device("cuda"))
    assert not optimizers.compiles_optimizer_step(precision.REGISTRY["bf16_no_compile"], torch.device("cuda"))


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2**-10)
    lower, upper = 1.0, 1.0 + 2**-7  # bf16 has 8 significant bits: the neighbours of 1 + 2^-10 are 1 and 1 + 2^-7
    rounded = optimizers.stochastic_round_to_bf16(x).float()
    assert set(rounded.unique().tolist()) == {lower, upper}
    assert (rounded == upper).float().mean().item() == pytest.approx(2**-10 / 2**-7, abs=0.005)  # 1/8
    assert x.to(torch.bfloat16).float().unique().tolist() == [lower], "round-to-nearest loses it"
    negative = optimizers.stochastic_round_to_bf16(-x).float()
    assert negative.mean().item() == pytest.approx(-x[0].item(), abs=2e-4)
    exact = torch.tensor([0.0, -2.0, 1.5, float("inf")])
    assert torch.equal(optimizers.stochastic_round_to_bf16(exact).float(), exact), "representable values stay"


@pytest.mark.parametrize("name, lands", [("bf16_naive", False), ("bf16_no_compile", True),
                                         ("bf16_sr_bf16_moments", True), ("bf16_kahan_bf16_moments", True)])
def test_updates_below_half_an_ulp_land_only_with_stochastic_rounding_or_kahan(name, lands):
    """200 AdamW steps with a constant gradient move a weight of 1.0 by lr per step (Adam normalises the step):
    2e-5 each, about 1/100 of bf16's half-ulp below 1 (2^-9). Round-to-nearest never moves it; stochastic rounding and Kahan
    summation land the fp32 total (0.004) within bf16's resolution and the noise of the random rounding."""
    torch.manual_seed(0)
    pc = precision.REGISTRY[name]
    weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    optimizer = optimizers.build_optimizer(pc, [{"params": [weight]}], lr=2e-5, betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=0.0, device=CPU)
    for _ in range(200):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    moved = 1.0 - weight.float().mean().item()
    if lands:
        assert moved == pytest.approx(200 * 2e-5, rel=0.1), moved
    else:
        assert moved == 0.0


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
    assert precision.resolve_names("core") == ["fp32_baseline", "amp_fp16", "amp_bf16", "bf16_sr_fp32_moments"]
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
    with pytest.raises(ValueError, match="keeps fp32 moments"):  # the fields must say what the optimizer does
        precision.PrecisionConfig("x", "x", weight_dtype=torch.bfloat16, weight_update_rounding="stochastic",
                                  exp_avg_sq_dtype=torch.bfloat16, optimizer="adamw_fp32_states")
    with pytest.raises(ValueError, match="parameters' \\(single\\) dtype"):
        precision.PrecisionConfig("x", "x", weight_dtype=torch.bfloat16, optimizer="adamw")


def test_naive_configs_do_their_update_arithmetic_in_the_weight_dtype():
    """Fused AdamW computes in fp32 internally; the naive configs must not get it (they would stop being naive)."""
    for name in ("fp16_naive", "bf16_naive"):
        _, optimizer, *_ = one_step(precision.REGISTRY[name])
        assert not optimizer.defaults["fused"]
    _, optimizer, *_ = one_step(precision.REGISTRY["fp32_baseline"])
    assert optimizer.defaults["fused"]


def test_check_dtypes_fails_on_moments_or_rounding_other_than_the_config_says():
    promised = precision.REGISTRY["bf16_sr_fp32_moments"]
    model, optimizer, _, logits, *_ = one_step(precision.REGISTRY["bf16_sr_bf16_moments"])  # bf16 moments
    with pytest.raises(precision.PrecisionMismatch, match=r"exp_avg_sq stored as \['bfloat16'\], config says float32"):
        precision.check_dtypes(promised, model.encoder, model.head, logits, optimizer)
    model, optimizer, _, logits, *_ = one_step(precision.REGISTRY["bf16_naive"])  # bf16 moments, nearest
    with pytest.raises(precision.PrecisionMismatch, match="rounds weight updates 'nearest'"):
        precision.check_dtypes(precision.REGISTRY["bf16_sr_bf16_moments"], model.encoder, model.head, logits,
                               optimizer)


# ---------------------------------------------------------------- loss scaling, TF32, loss dtype, evaluation


def test_check_dtypes_checks_the_grad_scaler_the_step_used():
    pc = precision.REGISTRY["amp_fp16"]
    model, optimizer, scaler, logits, loss, _ = one_step(pc)
    record = precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer, loss=loss, scaler=scaler)
    assert record["loss_scaling"] == {"enabled": True, "scaled": True}
    off = torch.amp.GradScaler("cpu", enabled=False)  # what a loop without loss scaling passes
    with pytest.raises(precision.PrecisionMismatch, match="GradScaler not used"):
        precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer, loss=loss, scaler=off)
    with pytest.raises(precision.PrecisionMismatch, match="GradScaler enabled but it scaled no loss"):
        precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer, loss=loss,
                               scaler=precision.grad_scaler(pc, CPU))  # built, never used in a backward
    bf16 = precision.REGISTRY["amp_bf16"]
    model, optimizer, _, logits, loss, _ = one_step(bf16)
    with pytest.raises(precision.PrecisionMismatch, match="GradScaler used"):
        precision.check_dtypes(bf16, model.encoder, model.head, logits, optimizer, loss=loss, scaler=scaler)


def test_check_dtypes_reads_the_tf32_flags_torch_has_set():
    pc = precision.REGISTRY["fp32_baseline"]
    model, optimizer, _, logits, *_ = one_step(pc)  # sets fp32_baseline's flags
    assert precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer)["tf32"] == {
        "cuda_matmul": False, "cudnn_conv": False, "mkldnn_matmul": False}
    try:
        precision.apply_matmul_precision(precision.REGISTRY["fp32_tf32_matmul"])
        with pytest.raises(precision.PrecisionMismatch, match="TF32 cuda_matmul is True, config says False"):
            precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer)
        precision.apply_matmul_precision(pc)
        torch.backends.cudnn.allow_tf32 = True  # torch's default: a run that never set its flags
        with pytest.raises(precision.PrecisionMismatch, match="TF32 cudnn_conv is True"):
            precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer)
        precision.apply_matmul_precision(pc)
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # the new API (what the HF Trainer sets), read back too
        with pytest.raises(precision.PrecisionMismatch, match="TF32 cuda_matmul is True"):
            precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer)
    finally:
        precision.apply_matmul_precision(pc)
    precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer)


def test_loss_dtype_comes_from_the_config_and_is_checked():
    pc = precision.REGISTRY["amp_bf16"]
    assert all(c.loss_dtype == torch.float32 for c in precision.REGISTRY.values())  # the plan's rule, kept
    model, optimizer, _, logits, loss, _ = one_step(pc)
    assert precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer, loss=loss)["loss"] == "float32"
    bf16_loss = dataclasses.replace(pc, loss_dtype=torch.bfloat16)
    with pytest.raises(precision.PrecisionMismatch, match="loss float32 != bfloat16"):
        precision.check_dtypes(bf16_loss, model.encoder, model.head, logits, optimizer, loss=loss)
    model, optimizer, _, logits, loss, _ = one_step(bf16_loss)  # a config that says otherwise gets it
    assert loss.dtype == torch.bfloat16
    precision.check_dtypes(bf16_loss, model.encoder, model.head, logits, optimizer, loss=loss)


@pytest.mark.parametrize("name", ["amp_bf16", "bf16_naive", "bf16_body_fp32_head", "fp16_naive"])
def test_fp32_evaluation_matches_an_fp32_copy_and_leaves_the_trained_weights_alone(name):
    """--eval_precision fp32 against an independent reference (a deep copy cast with .float(), no
    autocast); the trained model keeps its dtypes, and the evaluation passes check_dtypes as fp32."""
    pc = precision.REGISTRY[name]
    model = tiny_classifier(pc)
    precision.apply_matmul_precision(pc)
    model.eval()
    ids = torch.randint(3, 300, (4, 16))
    eval_pc = precision.eval_precision(pc, "fp32")
    assert precision.eval_precision(pc, "config") is pc
    evaluated = precision.model_for_eval(model, pc, eval_pc)
    assert (evaluated is model) == (pc.weight_dtype == pc.head_dtype == torch.float32)  # no copy when already fp32
    with torch.no_grad(), precision.autocast(eval_pc, CPU):
        logits = evaluated(ids, torch.ones_like(ids))
    with torch.no_grad():
        reference = copy.deepcopy(model).float()(ids, torch.ones_like(ids))
    assert torch.equal(logits, reference)
    loss = model_lib.bce_loss(logits, torch.zeros_like(logits), eval_pc.loss_dtype)
    record = precision.check_dtypes(eval_pc, evaluated.encoder, evaluated.head, logits, loss=loss)
    assert record["body_params"] == record["head_params"] == ["float32"] and record["logits"] == "float32"
    assert _dtypes_of(model) == {pc.weight_dtype, pc.head_dtype}
    if pc.autocast_dtype or pc.weight_dtype != torch.float32:  # the training config's check refuses fp32 logits
        with pytest.raises(precision.PrecisionMismatch):
            precision.check_dtypes(pc, evaluated.encoder, evaluated.head, logits, loss=loss)


def _dtypes_of(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


def test_adam_eps_override_is_one_function_and_never_zero():
    safe, naive = precision.REGISTRY["fp16_naive_safe_eps"], precision.REGISTRY["fp16_naive"]
    assert optimizers.adam_eps_of(safe, 1e-8) == 1e-4 and optimizers.adam_eps_of(naive, 1e-8) == 1e-8
    _, optimizer, *_ = one_step(safe)
    assert optimizer.defaults["eps"] == 1e-4
    with pytest.raises(ValueError, match="adam_eps must be positive"):  # `pc.adam_eps or run_eps` hid a 0
        dataclasses.replace(naive, adam_eps=0.0)


@pytest.mark.parametrize("dtype, rounding", [(torch.float32, "nearest"), (torch.bfloat16, "nearest"),
                                             (torch.float16, "nearest"), (torch.bfloat16, "stochastic")])
def test_fp32_states_optimizer_is_the_fp32_reference_step_bit_for_bit(dtype, rounding):
    """The multi-tensor AdamWFp32States against `adamw_fp32_step` run a tensor at a time, over tensors of several
    shapes in two groups (one without weight decay): moments bit-identical; new weights identical (rounded to
    nearest) or one of the two neighbours of the reference's fp32 weight (stochastic)."""
    torch.manual_seed(0)
    shapes = [(33, 7), (5,), (4, 3, 2), (1,)]
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    optimizer = optimizers.AdamWFp32States([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}],
                                           lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, rounding=rounding)
    decay = [0.1, 0.1, 0.0, 0.0]
    reference = [(p.detach().clone(), torch.zeros(p.shape), torch.zeros(p.shape)) for p in params]
    for step in range(1, 4):
        for p in params:
            p.grad = torch.randn(p.shape).to(dtype)
        expected = [optimizers.adamw_fp32_step(w, p.grad, m, v, step, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                                               weight_decay=wd)
                    for (w, m, v), p, wd in zip(reference, params, decay)]
        optimizer.step()
        for p, (weight, m, v) in zip(params, expected):
            state = optimizer.state[p]
            assert torch.equal(state["exp_avg"], m) and torch.equal(state["exp_avg_sq"], v)
            if rounding == "nearest":
                assert torch.equal(p.detach(), weight.to(dtype))
            else:
                # the reference truncated toward zero, or the next bf16 away from zero
                truncated = (weight.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
                away = torch.nextafter(truncated, (torch.sign(weight) * float("inf")).to(torch.bfloat16))
                assert bool(((p.detach() == truncated) | (p.detach() == away)).all())
        reference = [(p.detach().clone(), m, v) for p, (_, m, v) in zip(params, expected)]
