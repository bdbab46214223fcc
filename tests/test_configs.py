"""Typed training configs <-> flags (dtype_bench.configs), on both experiments' real TrainConfig classes."""
from __future__ import annotations

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


@pytest.mark.parametrize("argv, message", [
    (["--length_grouped_batches", "maybe"], "--length_grouped_batches: Expected a <class 'bool'>. Got value: maybe"),
    (["--max_steps", "many"], "--max_steps: Expected a <class 'int'>. Got value: many"),
    (["--report_to", "comet"], "--report_to: Expected a typing.Literal"),
    (["--threads", "some"], "--threads:"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
    (["--pres", "tiny"], "unrecognized arguments: --pres tiny"),  # no abbreviations
])
def test_a_malformed_value_is_one_line_naming_the_flag(argv, message):
    with pytest.raises(ValueError) as caught:
        parse(CLASSIFICATION, argv)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_none_is_none_for_every_optional_field_in_both_spellings():
    cfg = parse(CLASSIFICATION, ["--threads", "None", "--max_cpu_slowdown=none", "--max_eval_docs", "NONE"])
    assert (cfg.threads, cfg.max_cpu_slowdown, cfg.max_eval_docs) == (None, None, None)
    assert parse(CLASSIFICATION, ["--threads", "3", "--model_name", "none"]).model_name == "none"  # a str field


@pytest.mark.parametrize("module", [CLASSIFICATION, LM], ids=["classification", "lm"])
def test_help_of_a_preset_shows_its_defaults(module, capsys):
    tiny = module.PRESETS["tiny"]
    name = next(n for n in ("max_steps", "learning_rate") if tiny[n] != getattr(module.TrainConfig(), n))
    helps = {}
    for argv in ([], ["--preset", "tiny"]):
        with pytest.raises(SystemExit) as exited:
            parse(module, [*argv, "--help"])
        assert exited.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        helps[bool(argv)] = out[out.rindex(f"--{name} {name.upper()}"):][:300]
    assert f"default: {tiny[name]})" in helps[True]
    assert f"default: {getattr(module.TrainConfig(), name)})" in helps[False]


@pytest.mark.parametrize("module", [CLASSIFICATION, LM], ids=["classification", "lm"])
def test_a_printed_config_fed_back_is_the_same_config(module, tmp_path, capsys):
    argv = ["--preset", "tiny", "--max_steps", "7", "--threads", "none", "--checkpoints", "false", "--adam_eps", "1e-7"]
    with pytest.raises(SystemExit) as exited:
        parse(module, [*argv, "--print_config"])
    assert exited.value.code == 0
    (tmp_path / "flags.yaml").write_text(capsys.readouterr().out)
    expected = parse(module, argv)
    assert parse(module, ["--flags_file", str(tmp_path / "flags.yaml")]) == expected  # the file's preset, too
    assert expected.preset == "tiny" and expected.max_steps == 7 and expected.checkpoints is False
    assert parse(module, ["--flags_file", str(tmp_path / "flags.yaml"), "--max_steps", "8"]).max_steps == 8


def test_a_preset_before_a_flags_file_that_changes_it_is_refused(tmp_path):
    (tmp_path / "flags.yaml").write_text("preset: full\n")
    assert parse(CLASSIFICATION, ["--flags_file", str(tmp_path / "flags.yaml")]).preset == "full"
    with pytest.raises(ValueError, match="give --preset once, after any --flags_file"):
        parse(CLASSIFICATION, ["--preset", "tiny", "--flags_file", str(tmp_path / "flags.yaml")])
    assert parse(CLASSIFICATION, ["--flags_file", str(tmp_path / "flags.yaml"), "--preset", "tiny"]).max_steps == \
        CLASSIFICATION.PRESETS["tiny"]["max_steps"]
