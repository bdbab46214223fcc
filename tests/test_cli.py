"""`dtype-bench`: the registry table, --help everywhere, and `run` = the plan's command."""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import jsonargparse
import pytest

import tiny_run
from dtype_bench import cli, precision, runner


def test_configs_fits_a_terminal_and_describes_every_config(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert cli.main(["configs", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    starts = {line.split()[0] for line in lines[2:] if line and not line.startswith(" ")}
    assert set(precision.REGISTRY) <= starts
    assert "fp32 master weights, bf16 autocast" in out and "not on cpu:" in out and "TF32" in out


def test_version_is_the_packages():
    import importlib.metadata
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()) as printed:
        assert cli.main(["--version"]) == 0
    assert printed.getvalue().strip() == f"dtype-bench {importlib.metadata.version('dtype-bench')}"


def test_configs_prints_every_config_and_every_precision_field(capsys):
    assert cli.main(["configs", "--format", "markdown", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    fields = [f.name for f in dataclasses.fields(precision.PrecisionConfig) if f.name not in cli.NOT_COLUMNS]
    assert header == ["config", *fields, "compute_dtype", "needs", "runs on cpu"]
    rows = {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:2 + len(precision.REGISTRY)])}
    assert list(rows) == list(precision.REGISTRY)
    assert rows["amp_fp16"]["autocast_dtype"] == "float16" and rows["amp_fp16"]["loss_scaling"] == "dynamic"
    assert rows["bf16_sr_bf16_moments"]["compute_dtype"] == "bfloat16" and rows["bf16_sr_bf16_moments"]["needs"] == "torchao"
    assert rows["amp_bf16_8bit_adam"]["needs"] == "bitsandbytes"
    assert rows["fp32_tf32_matmul"]["runs on cpu"].startswith("no: TF32")
    assert rows["fp32_baseline"]["runs on cpu"] == "yes"
    assert "CUDA cc >= 8.9" in rows["amp_bf16_fp8"]["needs"]


class Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def parser_of(monkeypatch, argv: list[str]) -> argparse.ArgumentParser:
    """The parser a subcommand builds (captured when it parses, before anything runs)."""
    def capture(self, *args, **kwargs):
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    monkeypatch.setattr(jsonargparse.ArgumentParser, "parse_args", capture)  # the run.py parsers
    with pytest.raises(Parsed) as caught:
        cli.main(argv)
    return caught.value.parser


@pytest.mark.parametrize("argv", [["run"], ["run", "lm"], ["prepare"], ["prepare", "lm"], ["analyze"], ["compare"],
                                  ["bench"], ["bench", "loader"], ["configs"]])
def test_help_gives_every_flag_a_meaning_and_its_default(monkeypatch, argv):
    parser = parser_of(monkeypatch, argv)
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action) if action.help else ""
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if len(text.split()) < 2:
            problems.append(f"{action.option_strings}: no meaning given")
        elif not switch and not action.required and "default" not in text:
            problems.append(f"{action.option_strings}: the default is not stated: {text!r}")
    assert not problems, problems


@pytest.mark.parametrize("experiment", ["classification", "lm"])
def test_run_defaults_are_the_presets_values(monkeypatch, experiment):
    module = tiny_run.load_config_module(experiment)
    command = ["run"] if experiment == "classification" else ["run", "lm"]
    assert parser_of(monkeypatch, command).get_default("max_steps") == module.TrainConfig().max_steps
    parser = parser_of(monkeypatch, [*command, "--preset", "tiny"])
    assert parser.get_default("max_steps") == module.PRESETS["tiny"]["max_steps"] != module.TrainConfig().max_steps
    left = [f.name for f in dataclasses.fields(module.TrainConfig) if f.name not in module.PRESETS["tiny"]]
    assert {n: parser.get_default(n) for n in left if n != "preset"} == \
        {n: getattr(module.TrainConfig(), n) for n in left if n != "preset"}


def test_unknown_subcommand_is_a_usage_error(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown subcommand 'trian'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_run_is_the_seed_command(small_cache_dir, tmp_path):
    """`dtype-bench run` and `python experiments/classification/run.py` with the same flags: the same run id and
    the same step log, line for line (one thread, CPU: deterministic)."""
    flags = ["--config", "fp32_baseline", "--max_steps", "3", "--log_every", "1", "--eval_steps", "3"]
    seed_cmd = tiny_run.command(small_cache_dir, tmp_path / "seed", *flags)
    cli_cmd = [sys.executable, "-m", "dtype_bench.cli", "run",
               *tiny_run.command(small_cache_dir, tmp_path / "cli", *flags)[2:]]
    for cmd in (seed_cmd, cli_cmd):
        proc = subprocess.run(cmd, env=tiny_run.ENV, cwd=tiny_run.ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (seed_row,), (cli_row,) = tiny_run.rows(tmp_path / "seed"), tiny_run.rows(tmp_path / "cli")
    assert cli_row["run_id"] == seed_row["run_id"] and cli_row["status"] == seed_row["status"] == "completed"

    def losses(out):
        return [(r["step"], r.get("loss")) for r in map(json.loads, tiny_run.step_log(out, seed_row["run_id"]))]

    assert losses(tmp_path / "cli") == losses(tmp_path / "seed") and len(losses(tmp_path / "seed")) >= 3


def test_literal_fields_are_flags_with_choices():
    """--eval_precision / --report_to (Literal fields) parse their values and refuse others."""
    config_module = tiny_run.load_config_module("classification")
    _, cfg = runner.parse_args(None, config_module.TrainConfig, config_module.PRESETS,
                               ["--config", "amp_bf16", "--eval_precision", "fp32", "--report_to", "tensorboard"])
    assert (cfg.eval_precision, cfg.report_to) == ("fp32", "tensorboard")
    with pytest.raises(runner.UserError, match="--report_to: Expected a typing.Literal"):
        runner.parse_args(None, config_module.TrainConfig, config_module.PRESETS,
                          ["--config", "amp_bf16", "--report_to", "comet"])
