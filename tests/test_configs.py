"""Typed training configs <-> flags (dtype_bench.configs), on both experiments' real TrainConfig classes."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

import tiny_run
from dtype_bench import configs


CLASSIFICATION, LM = tiny_run.load_config_module("classification"), tiny_run.load_config_module("lm")


parse = tiny_run.parse_config


@pytest.mark.parametrize("module", [CLASSIFICATION, LM], ids=["classification", "lm"])
def test_every_field_has_its_docstring_as_help_inherited_ones_too(module):
    docs = configs.field_docs(module.TrainConfig)
    names = {f.name for f in dataclasses.fields(module.TrainConfig)}
    assert names - docs.keys() == set()
    assert {"grad_clip", "adam_eps", "threads"} <= names  # shared fields come from TrainingFields
    assert docs["grad_clip"].startswith("Max global L2 norm")


def test_an_experiment_can_change_a_shared_default_and_its_help():
    assert CLASSIFICATION.TrainConfig().adam_beta2 == 0.999 and LM.TrainConfig().adam_beta2 == 0.95
    assert "0.95" in configs.field_docs(LM.TrainConfig)["adam_beta2"]
    assert configs.field_docs(CLASSIFICATION.TrainConfig)["adam_beta2"] == "AdamW beta2."


def test_help_lists_the_experiments_own_fields_before_the_shared_ones():
    parser = argparse.ArgumentParser()
    configs.add_flags(parser, LM.TrainConfig)
    flags = [a.dest for a in parser._actions if a.dest != "help"]
    assert flags.index("n_layer") < flags.index("grad_clip") and flags.index("adam_beta2") < flags.index("grad_clip")
    assert flags[0] == "preset"


def test_flags_override_the_preset_which_overrides_the_defaults():
    cfg = parse(CLASSIFICATION, ["--preset", "tiny", "--max_steps", "7", "--length_grouped_batches", "yes",
                                 "--threads", "none"])
    assert cfg.max_steps == 7  # flag over the tiny preset's 500
    assert cfg.learning_rate == CLASSIFICATION.PRESETS["tiny"]["learning_rate"]  # preset over the default
    assert cfg.grad_clip == 1.0 and cfg.length_grouped_batches is True and cfg.threads is None
    assert parse(CLASSIFICATION, []).preset == "full" and parse(CLASSIFICATION, []).length_grouped_batches is False


@pytest.mark.parametrize("module, argv, flag", [
    (CLASSIFICATION, ["--batch_size", "0"], "--batch_size"),
    (CLASSIFICATION, ["--tiny_hidden", "100"], "--tiny_hidden"),
    (LM, ["--n_embd", "130"], "--n_embd"),
    (LM, ["--n_embd", "100", "--n_head", "3"], "multiple of --n_head"),
    (LM, ["--warmup_ratio", "1.5"], "--warmup_ratio"),
])
def test_invalid_values_fail_naming_the_flag(module, argv, flag):
    with pytest.raises(ValueError, match=flag):
        parse(module, argv)


def test_a_malformed_value_is_a_usage_error():
    with pytest.raises(SystemExit):
        parse(CLASSIFICATION, ["--length_grouped_batches", "maybe"])
