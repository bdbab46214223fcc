"""Typed training configs <-> command-line flags, shared by every experiment.

An experiment defines a dataclass whose fields carry docstrings (the string literal under each field) and a
dict of presets (field overrides). `training_parser` (jsonargparse) turns every field into a flag of the same
name, typed by its annotation, with its docstring as help and the chosen preset's values as defaults;
`parse` reads the command line into the dataclass: defaults <- preset <- --flags_file <- flags.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import re
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, TypeVar

import jsonargparse
import torch
import yaml

T = TypeVar("T")


@dataclass(frozen=True)
class TrainingFields:
    """Fields, validation and derived values shared by every experiment's training dataclass, which inherits
    this one. Only fields that mean the same in every experiment live here (an experiment may still change a
    default by re-declaring the field, e.g. the LM's adam_beta2); the others (batch_size,
    gradient_accumulation_steps, max_steps, eval_steps, eval_batch_size, learning_rate, warmup_ratio, dropout,
    weight_decay, diagnostics_every) are declared, with their own docstrings, by each experiment."""

    grad_clip: float = 1.0
    """Max global L2 norm of the gradients (after unscaling); 0 disables clipping."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon (a precision config may override it, e.g. fp16_naive_safe_eps)."""
    log_every: int = 10
    """Write a step-log line every this many optimizer steps (the only host syncs in the loop)."""
    timing_warmup_steps: int = 5
    """Optimizer steps excluded from throughput (compilation, allocator warm-up)."""
    diverge_patience: int = 5
    """Stop with status 'diverged' after this many consecutive optimizer steps with a non-finite loss."""
    checkpoints: bool = True
    """Write the run's last and best checkpoints (at evaluations and on stop signals). false (benchmark runs, whose
    checkpoints of a full-size model are 1.5-2 GB each) writes none: the run cannot be resumed, and what is
    evaluated after training is the final weights, not the best validation's."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    threads: Optional[int] = None
    """CPU threads for torch; None = torch's default for this machine (its physical cores, or OMP_NUM_THREADS),
    whatever the load (a busy machine gets a warning); a sweep passes its count to every run."""
    max_cpu_slowdown: Optional[float] = None
    """On a CPU, record as `skipped` a config whose compute dtype's matmuls measure more than this many times
    slower than fp32 here (emulated fp16/bf16; dtype_bench.cpu); None = run every config."""
    emulate_slow_matmuls: bool = False
    """Train the configs --max_cpu_slowdown would skip, their fp16/bf16 matmuls computed as fp32 matmuls of the
    same values rounded to the dtype (a native GEMM's numerics, at about fp32 speed; dtype_bench.cpu): their
    quality is the dtype's, their speed and memory the emulation's (the row says `matmuls_emulated`, the
    analysis compares only their quality)."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Also write the step log live to TensorBoard (<output_dir>/tensorboard/<run_id>) or Weights & Biases
    (offline without an API key); the JSONL step log stays the source of truth (dtype_bench.reporting)."""

    REFERENCE_RECIPE: ClassVar[dict[str, Any]] = {}
    """The published recipe the experiment's full preset reproduces (field -> value); not a flag."""

    def recipe_departures(self) -> dict[str, dict[str, Any]]:
        """field -> {"value": this run's, "recipe": the reference recipe's} for every field that differs from it:
        what a preset or a flag changed. Recorded in the results row; the report lists it under the setup."""
        return {name: {"value": getattr(self, name), "recipe": value} for name, value in self.REFERENCE_RECIPE.items()
                if getattr(self, name) != value}

    def check_training_fields(self, *positive: str) -> None:
        """Raise ValueError naming the flag for the first invalid common field (and `positive` extras)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name} must be a finite number, got {value}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ValueError(f"--adam_eps must be positive, got {self.adam_eps}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be positive (or none for torch's default), got {self.threads}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"--device {self.device!r} is not a device: pass auto, cpu, cuda or cuda:N") from e
        for name in (*positive, "batch_size", "gradient_accumulation_steps", "max_steps", "eval_steps",
                     "eval_batch_size", "log_every", "diverge_patience"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}")
        for name in ("warmup_ratio", "dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        from dtype_bench.reporting import require

        require(self.report_to)  # its writer's package is installed
        if self.weight_decay < 0 or self.grad_clip < 0 or self.timing_warmup_steps < 0 or self.diagnostics_every < 0:
            raise ValueError("--weight_decay, --grad_clip, --timing_warmup_steps and --diagnostics_every must be >= 0")

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_ratio * self.max_steps)

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps

    def to_record(self) -> dict:
        return dataclasses.asdict(self)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each annotated field of a class (a dataclass, a TypedDict: PEP 257 attribute
    docstrings), in order, inherited ones too; a class's own docstring for a field wins over its bases'."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if k.__module__ != "builtins"]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` keeps the description's layout and shows each flag's default unless its help already says it
    (switches are off by default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        stated = "default:" in text or "(default" in text
        if stated or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)


class FlagsHelpFormatter(jsonargparse.DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (each flag's type and default) with the description's layout kept."""


def _flag_values(argv: list[str], flag: str) -> list[str]:
    """The values given to `flag` in argv, in order (`--flag v` and `--flag=v`)."""
    return [value for arg, nxt in zip(argv, [*argv[1:], None]) for value in
            ([nxt] if arg == flag and nxt is not None else [arg[len(flag) + 1:]] if arg.startswith(flag + "=") else [])]


def _preset_of(presets: dict[str, dict], argv: list[str]) -> str:
    """The preset a command line asks for: its last --preset, else the `preset` of its last --flags_file that
    sets one, else 'full'. `parse` refuses a command line whose parsed preset differs."""
    preset = next(reversed(_flag_values(argv, "--preset")), None)
    for path in _flag_values(argv, "--flags_file") if preset is None else []:
        try:
            with open(path) as f:
                values = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue  # the real parse reports it
        if isinstance(values, dict) and values.get("preset") is not None:
            preset = str(values["preset"])
    return preset if preset in presets else "full"  # an unknown name: the real parse refuses it


def training_parser(description: str | None, cfg_cls: type, presets: dict[str, dict],
                    argv: list[str]) -> jsonargparse.ArgumentParser:
    """--preset, --flags_file (with the --print_config jsonargparse adds beside it) and one flag per field of
    `cfg_cls`, its docstring as help; the fields' defaults are those of the preset `argv` asks for, so
    `--preset tiny --help` shows tiny's values. Flags are spelled whole (no abbreviations: the preset is read
    from argv before parsing)."""
    preset = _preset_of(presets, argv)
    parser = jsonargparse.ArgumentParser(description=description, formatter_class=FlagsHelpFormatter,
                                         exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--preset", choices=sorted(presets), default=preset,
                        help="which defaults the training fields start from; `--preset NAME --help` shows them")
    parser.add_argument("--flags_file", action=jsonargparse.ActionConfigFile,
                        help="a YAML file of flags (what --print_config prints); flags after it override it "
                             "(default: none)")
    parser.add_class_arguments(cfg_cls, nested_key=None, skip={"preset"})
    parser.set_defaults({name: value for name, value in presets[preset].items() if name != "preset"})
    return parser


def _none_as_null(cfg_cls: type, argv: list[str]) -> list[str]:
    """argv with `none` (any case) given to an Optional field spelled `null`, YAML's None."""
    optional = {f"--{name}" for name, hint in typing.get_type_hints(cfg_cls).items()
                if type(None) in typing.get_args(hint)}
    out: list[str] = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if eq and flag in optional and value.lower() == "none":
            arg = f"{flag}=null"
        elif i and argv[i - 1] in optional and arg.lower() == "none":
            arg = "null"
        out.append(arg)
    return out


def parse(parser: jsonargparse.ArgumentParser, cfg_cls: type[T], argv: list[str]) -> tuple[jsonargparse.Namespace, T]:
    """The flags and the validated training config; ValueError (one line) for any bad flag or value."""
    try:
        args = parser.parse_args(_none_as_null(cfg_cls, argv))
    except argparse.ArgumentError as e:
        raise ValueError(re.sub(r'^Parser key "(\w+)":', r"--\1:", " ".join(str(e).split()))) from e
    if args.preset != parser.get_default("preset"):  # a --flags_file's preset after the --preset flag
        raise ValueError(f"the defaults are --preset {parser.get_default('preset')}'s but the flags say --preset "
                         f"{args.preset}: give --preset once, after any --flags_file")
    names = [f.name for f in dataclasses.fields(cfg_cls) if f.init and f.name != "preset"]
    return args, cfg_cls(preset=args.preset, **{name: args[name] for name in names})
