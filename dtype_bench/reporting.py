"""`--report_to tensorboard | wandb`: live views of the JSONL step log, written by the libraries' own writers.

The step log (results.StepLog) stays the source of truth: each view receives exactly the records written to it,
as they are written, and turns every numeric value into a scalar at the record's step (nested dicts, such as the
diagnostics per parameter group, become `key/group`). Training lines go under `train/`, evaluation lines under
their split (`validation/micro_f1`). NaN and Inf are passed on, as the log keeps them. The run's precision and
training configs are logged once as hyperparameters.

TensorBoard: `<output_dir>/tensorboard/<run_id>/` (`tensorboard --logdir <output_dir>/tensorboard`); a resumed run
purges the events after its checkpoint, as the step log is cut back. Weights & Biases: project
`dtype-bench-<experiment>`, run name and id = the run id (a resumed run continues it), offline unless WANDB_MODE
says otherwise or an API key is set (`wandb sync <output_dir>/wandb/offline-run-*` uploads later).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

REPORT_TO = ("none", "tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install 'dtype-bench[tensorboard]'", "wandb": "pip install 'dtype-bench[wandb]'"}
NOT_SCALARS = ("step", "eval")


class StepLogView(Protocol):
    def open(self, first_step: int | None) -> None:
        """Before the first record; `first_step` is where a resumed log continues (None: a new log)."""

    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


def require(report_to: str) -> None:
    """Raise ValueError (before anything runs) if the writer's package is not installed."""
    if report_to not in REPORT_TO:
        raise ValueError(f"--report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if module:
        try:
            __import__(module)
        except ImportError as e:
            raise ValueError(f"--report_to {report_to} needs the {module} package ({e}); {INSTALL[report_to]}") from e


def scalars(record: dict) -> dict[str, float]:
    """tag -> value for every number in a step-log record (bools as 0/1), nested keys joined with '/'."""
    prefix = record.get("eval") or "train"
    out: dict[str, float] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}/{k}", v)
        elif isinstance(value, (int, float)):  # bool is an int
            out[key] = float(value)

    for key, value in record.items():
        if key not in NOT_SCALARS:
            walk(f"{prefix}/{key}", value)
    return out


def hyperparameters(cfg: Any, pc: Any, seed: int, run_id: str) -> dict[str, Any]:
    """The run's configs flattened to `section.field` -> str/int/float/bool (what both writers accept)."""
    flat: dict[str, Any] = {"run_id": run_id, "config": pc.name, "seed": seed}
    for section, record in (("precision", pc.to_record()), ("train", cfg.to_record())):
        for key, value in record.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return flat


class TensorBoardView:
    def __init__(self, log_dir: Path, hparams: dict[str, Any]):
        self.log_dir, self.hparams, self.writer = log_dir, hparams, None

    def open(self, first_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(self.log_dir), purge_step=first_step)
        # In this run's own directory (SummaryWriter.add_hparams would start another one), with no metrics: the
        # scalars are the metrics.
        for summary in hparams(self.hparams, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in self.hparams.items()))

    def write(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()  # a log line is rare (every log_every steps): make it visible now

    def close(self) -> None:
        self.writer.close()


class WandbView:
    def __init__(self, output_dir: Path, project: str, run_id: str, hparams: dict[str, Any]):
        self.output_dir, self.project, self.run_id, self.hparams, self.run = output_dir, project, run_id, hparams, None

    def open(self, first_step: int | None) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.project, name=self.run_id, id=self.run_id, resume="allow",
                              config=self.hparams, dir=str(self.output_dir), mode=mode)

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def views(cfg: Any, pc: Any, seed: int, run_id: str, experiment: str) -> list[StepLogView]:
    """The writers `cfg.report_to` asks for, for a run's StepLog (`views=`)."""
    require(cfg.report_to)
    hparams = hyperparameters(cfg, pc, seed, run_id)
    output_dir = Path(cfg.output_dir)
    if cfg.report_to == "tensorboard":
        return [TensorBoardView(output_dir / "tensorboard" / run_id, hparams)]
    if cfg.report_to == "wandb":
        return [WandbView(output_dir, f"dtype-bench-{experiment}", run_id, hparams)]
    return []
