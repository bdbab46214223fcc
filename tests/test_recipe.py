"""The full presets are the reference recipes and nothing else; presets and flags that depart are recorded."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import tiny_run

CLASSIFICATION, LM = tiny_run.load_config_module("classification"), tiny_run.load_config_module("lm")


resolve = tiny_run.parse_config


@pytest.mark.parametrize("module", [CLASSIFICATION, LM], ids=["classification", "lm"])
def test_full_preset_is_the_reference_recipe(module):
    cfg = resolve(module, [])
    assert cfg.recipe_departures() == {}
    recipe = module.TrainConfig.REFERENCE_RECIPE
    assert recipe and all(getattr(cfg, k) == v for k, v in recipe.items())
    assert "REFERENCE_RECIPE" not in {f.name for f in dataclasses.fields(cfg)}  # not a flag


def test_seed_recipe_values_and_the_head_prior_is_a_tiny_only_departure():
    seed = CLASSIFICATION.TrainConfig.REFERENCE_RECIPE
    assert (seed["batch_size"], seed["gradient_accumulation_steps"], seed["max_steps"], seed["eval_steps"]) == \
        (8, 4, 5000, 500)
    assert (seed["learning_rate"], seed["weight_decay"], seed["warmup_ratio"], seed["grad_clip"]) == \
        (2e-5, 0.01, 0.1, 1.0)
    assert seed["model_name"] == "roberta-base" and seed["max_length"] == 512 and seed["head_bias_prior"] is False
    tiny = resolve(CLASSIFICATION, ["--preset", "tiny"]).recipe_departures()
    assert tiny["head_bias_prior"] == {"value": True, "recipe": False}
    assert tiny["model_name"] == {"value": "tiny", "recipe": "roberta-base"}
    flagged = resolve(CLASSIFICATION, ["--head_bias_prior", "true", "--learning_rate", "3e-5"]).recipe_departures()
    assert flagged == {"head_bias_prior": {"value": True, "recipe": False},
                       "learning_rate": {"value": 3e-5, "recipe": 2e-5}}


def test_head_without_prior_is_nn_linear_default_init_and_prior_sets_the_bias():
    from experiments.classification import model as model_lib
    from dtype_bench import precision

    encoder = model_lib.build_encoder("tiny", vocab_size=100, pad_token_id=1, max_length=16, tiny_layers=1,
                                      tiny_hidden=64)
    pc, cpu = precision.get("fp32_baseline"), torch.device("cpu")
    torch.manual_seed(123)
    plain = model_lib.MultiLabelClassifier(encoder, 50, 0.1, precision.head_autocast(pc, cpu), label_prior=None)
    torch.manual_seed(123)
    reference = nn.Linear(64, 50)  # the same RNG draws, so the same default (Kaiming-uniform) initialisation
    assert torch.equal(plain.head.weight, reference.weight) and torch.equal(plain.head.bias, reference.bias)
    with_prior = model_lib.MultiLabelClassifier(encoder, 50, 0.1, precision.head_autocast(pc, cpu), label_prior=0.01)
    assert torch.allclose(with_prior.head.bias, torch.full((50,), math.log(0.01 / 0.99)))
