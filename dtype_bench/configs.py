"""Typed training configs <-> command-line flags, shared by every experiment.

An experiment defines a dataclass whose fields carry docstrings (the string literal under each field) and a
dict of presets (field overrides). `add_flags` turns every field into a flag of the same name with its
docstring as help; `resolve` applies preset defaults, then the flags the user actually gave.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, TypeVar

import torch

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
    """The docstring written under each dataclass field (PEP 257 attribute docstrings), inherited ones too;
    a class's own docstring for a field wins over its bases'."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parser_for(annotation: Any):
    """argparse `type` for a field annotation (Optional[X] accepts 'none')."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) is not typing.Literal else ()
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if typing.get_origin(base) is typing.Literal:
        base = type(typing.get_args(base)[0])
    if base is bool:
        convert = lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]  # noqa: E731
    else:
        convert = base

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return convert(text)
        except (KeyError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}") from e

    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` keeps the description's layout and shows each flag's default unless its help already says it
    (switches are off by default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        stated = "default:" in text or "(default" in text
        if stated or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _default_text(f: dataclasses.Field, presets: dict[str, dict]) -> str:
    """'[default: X; --preset tiny: Y]': the dataclass default and each preset that overrides it."""
    default = (f.default if f.default is not dataclasses.MISSING
               else f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
    parts = [f"default: {default}"] + [f"--preset {name}: {values[f.name]}" for name, values in presets.items()
                                       if f.name in values and values[f.name] != default]
    return "[" + "; ".join(parts) + "]"


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
              presets: dict[str, dict] | None = None) -> None:
    """One `--name` flag per field; default None so `resolve` can tell 'given' from 'preset default'. The help
    is the field's docstring, its default and the value each preset gives it."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields (defaults depend on --preset)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    own = [n for n in cls.__dict__.get("__annotations__", {}) if n in fields]  # in the class body's order
    for f in [fields[n] for n in own] + [f for n, f in fields.items() if n not in own]:  # the experiment's first
        if f.name in skip or not f.init:
            continue
        choices = None
        base = hints[f.name]
        lit = [a for a in (base, *typing.get_args(base)) if typing.get_origin(a) is typing.Literal]
        if lit:
            choices = typing.get_args(lit[0])
        text = f"{docs.get(f.name, '')} {_default_text(f, presets or {})}".replace("%", "%%")
        if base is bool:  # a switch: `--name` turns it on, `--name false` off
            group.add_argument(f"--{f.name}", type=_parser_for(base), default=None, nargs="?", const=True,
                               help=text, metavar="false")
        else:
            group.add_argument(f"--{f.name}", type=_parser_for(base), default=None, choices=choices, help=text,
                               metavar=None if choices else f.name.upper())


def resolve(cls: type[T], presets: dict[str, dict], preset: str, args: argparse.Namespace) -> T:
    """Dataclass defaults <- preset overrides <- flags given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {**presets[preset], **({"preset": preset} if "preset" in names else {})}
    for name in names - {"preset"}:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    return cls(**values)
