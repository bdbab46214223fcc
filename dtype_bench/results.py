"""Results rows, step logs and the environment record, shared by every experiment.

Layout of an output directory:
    results.jsonl          one row per finished run (completed | diverged | skipped | failed), appended atomically;
                           its fields are `ResultRow`'s (README's schema table: `python -m dtype_bench.results`)
    logs/<run_id>.jsonl    that run's step log; NaN/Inf are written as NaN/Infinity, never replaced
    setup.json             the setup fingerprint the directory belongs to (other setups are refused)
A forecast's runs (`--forecast`, the first fraction of each run) go to the sibling `forecast_dir(output_dir)`, a
setup of their own: a full sweep in output_dir neither sees nor is refused by them.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import IO, Iterable, Required, TypedDict, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch

from dtype_bench.io import (
    append_jsonl, atomic_directory, atomic_write_json, claim_folder, fsync_dir, json_dumps, lock, open_no_link,
    read_jsonl,
)

STATUSES = ("completed", "diverged", "skipped", "failed")
STEP_LOG_TIMING = ("samples_per_second",)
"""Wall-clock fields of step-log lines: the only ones that differ between two runs of the same command."""
SETUP_FILE = "setup.json"  # also what makes an output dir ours (io.claim_folder)
REPORTED_METRICS = ("samples_per_second", "peak_memory_gb", "micro_f1", "macro_f1",
                    "precision_at_1", "precision_at_3", "precision_at_5")


class ResultRow(TypedDict, total=False):
    """One line of results.jsonl: one run's outcome. A row holds the fields its run produced (a skipped or
    failed run few, a completed one most); each field below says when it is there. NaN and Infinity are kept."""

    # ---- what ran and how it ended
    experiment: str
    """`classification` or `lm`."""
    run_id: Required[str]
    """experiment-config-seed-setup; names the step log `logs/<run_id>.jsonl` and the checkpoint folder."""
    config: str
    """The precision config's registry name (`dtype-bench configs`)."""
    seed: int
    """The run's seed (model init, data order, dropout, stochastic rounding)."""
    setup_fingerprint: str
    """Hash of everything but config and seed (training fields, data, device type): an output directory holds
    one setup only."""
    status: Required[str]
    """`completed`, `diverged` (with `diverged_at_step`), `skipped` (with `reason`) or `failed` (with `error`)."""
    reason: str
    """Why a `skipped` run did not train (the hardware cannot run the config, or `--max_cpu_slowdown`)."""
    error: str
    """A `failed` run's exception, as `Type: message`."""
    wall_seconds: float
    """Wall time of the whole run in its last process: build, training, evaluations."""
    world_size: int
    """Processes that trained the run (torchrun), 1 otherwise."""
    precision: dict
    """The resolved precision config (`PrecisionConfig.to_record()`)."""
    train_config: dict
    """The resolved training config (every field)."""
    recipe_departures: dict
    """Training fields that depart from the experiment's published recipe: field -> {value, recipe}."""
    env: dict
    """torch and CUDA versions, device and its name, CPU count, torch threads, Python, platform, git commit, and
    `forked`: whether the run's process was forked by a sweep's server (dtype_bench.sweep) rather than started as
    its own interpreter (a CPU peak RSS then lacks the pages importing left behind: 0.06 GiB less on the demo)."""

    # ---- progress
    steps: int
    """Optimizer steps done."""
    micro_batches: int
    """Micro-batches computed, all ranks (steps x gradient accumulation)."""
    samples_seen: int
    """Training samples: micro-batches x batch size."""
    tokens_seen: int
    """LM: training tokens (samples x block size)."""
    skipped_steps: int
    """Optimizer steps the GradScaler skipped (non-finite scaled gradients)."""
    resumed_from_steps: list
    """The steps each resume started from (empty for an uninterrupted run)."""
    segments: list
    """One entry per process of the run: the steps it trained (`from_step`, `to_step`] and its torch `threads`."""
    diverged_at_step: int
    """A `diverged` run: the first step of the non-finite loss streak (`--diverge_patience` steps) that stopped it."""
    first_nonfinite_step: int
    """A `diverged` run: the first step with a non-finite loss."""
    nonfinite_origin: str | None
    """Where the first non-finite value appeared (a layer's forward or backward, a gradient, an optimizer
    state), found on a diagnostics step; None if none was seen."""
    nonfinite_origin_step: int | None
    """The step at which `nonfinite_origin` was seen."""

    # ---- data and model
    data: dict
    """The prepared cache's source as its meta.json records it (`kind`: the archive zip or folder, a hub id,
    `synthetic`, or `synthetic-ids` for the full-size shape on random token ids, whose quality metrics mean
    nothing)."""
    padding_fraction: float
    """Classification: share of the token positions computed in training that were padding (dynamic padding to
    each micro-batch's longest document)."""
    model_source: dict
    """Classification: where the encoder's weights came from (`config`: random init; `local`: path and SHA-256
    of its weight files; `hub`: id and commit hash)."""
    init_weights_sha256: str | None
    """Classification: SHA-256 of the `--init_weights` file the model started from; None without one."""
    n_params: int
    """LM: parameters of the model."""

    # ---- throughput
    samples_per_second: float | None
    """Training throughput of the whole job: median over timing windows of optimizer steps after warm-up,
    evaluation excluded, device synchronised; None without a timed step."""
    samples_per_second_min: float
    """Slowest timing window, whole job."""
    samples_per_second_max: float
    """Fastest timing window, whole job."""
    samples_per_second_per_device: float | None
    """`samples_per_second` of one device (torchrun: over the world size)."""
    tokens_per_second: float | None
    """LM: `samples_per_second` x block size (every training sequence is block size long)."""
    timing_windows: int
    """Timing windows the median is over."""
    timed_steps: int
    """Optimizer steps inside the timing windows (warm-up and diagnostics steps are not timed)."""
    timed_samples: int
    """Samples of this process inside the timing windows."""
    timed_seconds: float
    """Seconds inside the timing windows."""
    timing_warmup_steps: int
    """Untimed steps at the start (compilation, allocator warm-up)."""
    timing_note: str
    """Why there is no throughput (no optimizer step after the warm-up steps)."""
    warmup_seconds: float | None
    """Host seconds from the first step to the first timed one."""
    host_timed_seconds: float
    """The host clock's seconds over the timed stretch: an independent check of the device timer."""
    host_over_window_seconds: float
    """`host_timed_seconds` over the windows' seconds."""
    paused_windows: int
    """Pauses of the timer (log flushes, evaluations) inside the host-clock stretch."""
    timer_check: str
    """`agrees` or `differs`: the host clock and the timing windows within tolerance of each other."""
    train_wall_seconds: float
    """Wall time of the training loop, over every process that trained the run."""
    eval_wall_seconds: float
    """Wall time of the validations during training, this process."""
    evaluations: int
    """Validations during training, this process."""

    # ---- FLOPs and MFU
    model_flops_per_sample: float | None
    """Model FLOPs of one training sample (forward and backward, `flops_formula`), at the widths computed."""
    flops_formula: str
    """How `model_flops_per_sample` is counted."""
    model_flops_per_second: float | None
    """`model_flops_per_sample` x samples/s per device."""
    peak_flops_measured: float | None
    """One device's matmul peak in `peak_flops_dtype`, measured here before training."""
    peak_flops_datasheet: float | None
    """One device's datasheet matmul peak in `peak_flops_dtype`; None where unknown (CPUs)."""
    peak_flops_dtype: str
    """The dtype the peaks are for."""
    mfu_basis: str
    """What the peak dtype stands for (float8 configs are compared at bf16-equivalent peaks)."""
    mfu: float | None
    """`model_flops_per_second` over `peak_flops_measured`."""
    mfu_datasheet: float | None
    """`model_flops_per_second` over `peak_flops_datasheet`."""

    # ---- compilation
    compiled: bool
    """Whether the model ran torch.compile'd code."""
    optimizer_step_compiled: bool
    """Whether the optimizer step ran torch.compile'd code (torchao's optimizers)."""
    matmuls_emulated: bool
    """Whether the run's fp16/bf16 matmuls were computed as fp32 matmuls of the same values rounded to the dtype
    (--emulate_slow_matmuls, on a CPU without native ones): its quality metrics are the dtype's; its speed, memory
    and op counts are the emulation's, and the analysis leaves them out of every comparison."""
    compile: dict
    """What torch.compile did, from dynamo's records: `graphs`, `graph_breaks`, `recompiles` (first
    `recompile_reasons`), `recompile_limit_hits` / `fell_back` (dynamo gave up past `recompile_limit` and ran that
    code eagerly), `frames_compiled`, `frames_run_eagerly`, `last_compile_step`; diagnostics steps run their
    forward and backward eagerly, untimed."""
    sdpa_ops: list | None
    """The scaled-dot-product attention ops that ran, profiled on the last warm-up step."""

    # ---- memory
    peak_memory_gb: float
    """The larger of the training and evaluation peaks, GiB: CUDA max allocated; CPU peak RSS."""
    train_peak_memory_gb: float | None
    """Training peak, GiB (CPU: of the training phase, `peak_memory_kind`)."""
    eval_peak_memory_gb: float | None
    """Evaluation peak, GiB; None where the CPU peak cannot be reset per phase."""
    peak_memory_kind: str
    """`cuda_max_allocated`, `cpu_peak_rss_per_phase`, or `cpu_peak_rss_whole_process` where the kernel does not
    allow resetting the RSS high-water mark."""
    train_peak_memory_reserved_gb: float
    """CUDA: training peak reserved by the allocator, GiB."""
    eval_peak_memory_reserved_gb: float | None
    """CUDA: evaluation peak reserved by the allocator, GiB."""
    static_memory_bytes: dict
    """Bytes of the tensors the run allocated (8-bit and quantized states at their stored size): `weights`,
    `grads`, `optimizer_state`, each per parameter group and `total`; benchmarks/gpu_check.py compares them with
    the config's prediction (`memory.predicted_static_bytes`)."""
    optimizer_8bit_params: dict | None
    """Per parameter group, the parameters whose optimizer state is stored in 8 bits."""

    # ---- precision, as it ran
    dtypes: dict | None
    """What training actually allocated, computed and set (body/head parameters, logits, loss, optimizer state,
    weight-update rounding, `loss_scaling` {enabled, scaled}, `tf32` flags per backend), checked against the
    config after the first step."""
    eval_dtypes: dict | None
    """The same for evaluation (parameters, logits, loss, TF32), checked on its first batch against the
    evaluation precision."""
    eval_precision: str
    """Classification: the evaluation precision (`config`: the config's own; `fp32`: its weights upcast)."""
    mean_update_fidelity: dict
    """Per parameter group, the mean over diagnostics steps of <applied update, intended> / ||intended||^2, the
    intended update an fp32 shadow AdamW's (None without a measured step; dtype_bench/diagnostics.py)."""
    diagnostics_measured_steps: int
    """Diagnostics steps measured."""

    # ---- classification quality: test split, best-validation weights (rules: experiments/classification/metrics.py)
    micro_f1: float
    """Test split with the best validation's weights, as every classification metric below without `val_`:
    micro-F1 over all (document, label) pairs; unseen gold labels count as missed."""
    macro_f1: float
    """The plan's "average across all labels": mean F1 over every label of the label space, 0/0 -> 0
    (scikit-learn's `f1_score(average="macro", zero_division=0)`)."""
    macro_f1_present_labels: float
    """Macro-F1 over only the labels with at least one gold positive in the evaluated split."""
    precision_at_1: float
    """Precision@1 over all documents."""
    precision_at_3: float
    """Precision@3 over all documents."""
    precision_at_5: float
    """Precision@5 over all documents."""
    rp_at_5: float
    """EURLEX57K R-Precision@5 over documents with gold."""
    ndcg_at_5: float
    """EURLEX57K nDCG@5 over documents with gold."""
    nonfinite_scores: int
    """NaN/Inf logits in the evaluated split (any makes every quality metric NaN)."""
    n_docs: int
    """Documents evaluated."""
    n_docs_no_gold: int
    """Documents without any gold label (left out of rp_at_5 and ndcg_at_5)."""
    n_unseen_gold: int
    """Gold labels outside the training label space (counted as missed)."""
    loss: float
    """Mean BCE loss on the test split."""
    best_val_step: int
    """The validation step whose weights the test split is evaluated with (best validation micro-F1)."""
    val_micro_f1: float
    """`micro_f1` on validation at `best_val_step`."""
    val_macro_f1: float
    """`macro_f1` on validation at `best_val_step`."""
    val_macro_f1_present_labels: float
    """`macro_f1_present_labels` on validation at `best_val_step`."""
    val_precision_at_1: float
    """`precision_at_1` on validation at `best_val_step`."""
    val_precision_at_3: float
    """`precision_at_3` on validation at `best_val_step`."""
    val_precision_at_5: float
    """`precision_at_5` on validation at `best_val_step`."""
    val_rp_at_5: float
    """`rp_at_5` on validation at `best_val_step`."""
    val_ndcg_at_5: float
    """`ndcg_at_5` on validation at `best_val_step`."""
    val_nonfinite_scores: int
    """`nonfinite_scores` on validation at `best_val_step`."""
    val_n_docs: int
    """`n_docs` on validation."""
    val_n_docs_no_gold: int
    """`n_docs_no_gold` on validation."""
    val_n_unseen_gold: int
    """`n_unseen_gold` on validation."""

    # ---- language modelling quality
    val_loss: float
    """Validation loss: classification at `best_val_step`; LM the mean next-token loss of the last evaluation."""
    perplexity: float
    """LM: exp(`val_loss`)."""
    val_loss_curve: list
    """LM: [step, validation loss] of every evaluation."""


FIELD_TYPES: dict[str, type] = get_type_hints(ResultRow)
REQUIRED = tuple(key for key, hint in get_type_hints(ResultRow, include_extras=True).items()
                 if get_origin(hint) is Required)
README = Path(__file__).resolve().parents[1] / "README.md"
SCHEMA_BEGIN = ("<!-- results schema: generated from dtype_bench.results.ResultRow by "
                "`python -m dtype_bench.results --readme` -->")
SCHEMA_END = "<!-- end of results schema -->"


def field_docs() -> dict[str, str]:
    """`ResultRow`'s fields, in order, each with the docstring written under it."""
    from dtype_bench.configs import field_docs as attribute_docs  # the README's schema only: not on a run's path

    return attribute_docs(ResultRow)


def _kinds(key: str) -> tuple[type, ...]:
    """The runtime types a field's annotation allows (`dict[str, int]` -> dict; `X | None` -> X, NoneType)."""
    hint = FIELD_TYPES[key]
    kinds = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    return tuple(get_origin(k) or k for k in kinds)


def _type_problem(key: str, value: object) -> str | None:
    kinds = _kinds(key)
    fits = (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
            or float in kinds and isinstance(value, int) and not isinstance(value, bool))  # JSON: 1 is a number
    names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
    return None if fits else f"{key} is {type(value).__name__}, not {names}"


def unknown_fields(fields: Iterable[str]) -> list[str]:
    """The names among `fields` that `ResultRow` does not define."""
    return [key for key in fields if key not in FIELD_TYPES]


def row_fields(**fields) -> ResultRow:
    """`fields` as part of a results row; ValueError for a name `ResultRow` does not define or a value of another
    type. Every assembler of row fields builds them through this (or `append_result`, which checks the whole row)."""
    unknown = unknown_fields(fields)
    if unknown:
        raise ValueError(f"not fields of a results row (dtype_bench.results.ResultRow): {', '.join(unknown)}")
    for key, value in fields.items():
        problem = _type_problem(key, value)
        if problem:
            raise ValueError(f"results row: {problem}")
    return ResultRow(**fields)  # type: ignore[typeddict-item]


def _json_type(key: str) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array",
             type(None): "null"}
    return " or ".join(names[k] for k in _kinds(key))


def schema_table() -> str:
    """README's results-schema table: one line per `ResultRow` field with its JSON type and docstring."""
    lines = ["| field | type | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | {_json_type(key)} | {doc.replace('|', '/')} |" for key, doc in field_docs().items()]
    return "\n".join(lines)


def readme_with_schema(readme: str) -> str:
    """`readme` with the text between SCHEMA_BEGIN and SCHEMA_END replaced by `schema_table()`."""
    head, begin, rest = readme.partition(SCHEMA_BEGIN)
    _, end, tail = rest.partition(SCHEMA_END)
    if not begin or not end:
        raise ValueError(f"README has no schema section between {SCHEMA_BEGIN!r} and {SCHEMA_END!r}")
    return f"{head}{SCHEMA_BEGIN}\n{schema_table()}\n{SCHEMA_END}{tail}"


def forecast_dir(output_dir: str | Path) -> Path:
    """Where the forecast runs of a sweep into `output_dir` go: beside it (inside, its folder would no longer be
    empty before the full sweep claims it)."""
    output_dir = Path(output_dir)
    return output_dir.with_name(f"{output_dir.name}-forecast")


class SetupMismatch(RuntimeError):
    pass


def run_id(experiment: str, config: str, seed: int, setup_fingerprint: str) -> str:
    """Stable across re-runs of the same command, so a re-run can find its checkpoint and row."""
    return f"{experiment}-{config}-seed{seed}-{setup_fingerprint[:8]}"


def claim_output_dir(output_dir: str | Path, setup_fingerprint: str, setup: dict) -> None:
    """An output dir belongs to one setup (everything but config and seed): mixing setups in one
    results.jsonl would average incomparable runs. Refuse with one line instead, and refuse a folder that
    is not ours at all (`claim_folder`). Checked and claimed under one lock, so that two setups started
    at the same moment cannot both claim it."""
    output_dir = Path(output_dir)
    claim_folder(output_dir, SETUP_FILE, "fingerprint")  # before creating the lock's folder
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with lock(output_dir.parent / f".{output_dir.name}.setup.lock"):
        claim_folder(output_dir, SETUP_FILE, "fingerprint")
        marker = output_dir / SETUP_FILE
        if not marker.exists():  # absent or empty: it appears with its setup.json, never half-claimed
            with atomic_directory(output_dir, SETUP_FILE, "fingerprint") as tmp:
                atomic_write_json(tmp / SETUP_FILE, {"fingerprint": setup_fingerprint, "setup": setup})
            return
        existing = json.loads(marker.read_text())
    if existing.get("fingerprint") != setup_fingerprint:
        differing = sorted(k for k in set(setup) | set(existing.get("setup", {}))
                           if setup.get(k) != existing.get("setup", {}).get(k))
        raise SetupMismatch(
            f"{output_dir} holds results of a different setup (differs in: {', '.join(differing) or '?'}); "
            "pass another --output_dir"
        )


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "forked": multiprocessing.parent_process() is not None,
    }


def append_result(output_dir: str | Path, row: ResultRow) -> None:
    """Append `row` to results.jsonl; ValueError, and nothing written, for a row `row_problem` refuses or with a
    field `ResultRow` does not define."""
    problem = row_problem(row) or (f"unknown fields {', '.join(unknown_fields(row))}" if unknown_fields(row) else None)
    if problem:
        raise ValueError(f"results row refused: {problem}")
    append_jsonl(Path(output_dir) / "results.jsonl", row)


def latest_per_run(rows: Iterable[dict]) -> dict[str, dict]:
    """run_id -> the run's newest row (a retried or restarted run appends a new row; the newest counts)."""
    return {row["run_id"]: row for row in rows if "run_id" in row}


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}")  # names a step log and a checkpoint folder: never a path


def row_problem(row: dict) -> str | None:
    """What makes a results row unusable (a missing required field, a field of another type than `ResultRow`
    gives it, a run id that is not a plain name, an unknown status), or None: such a row is reported as a
    malformed line, never read. Fields `ResultRow` does not define (a row written by another version) are kept
    as they are; `append_result` refuses them."""
    for key in REQUIRED:
        if key not in row:
            return f"no {key}"
    for key, value in row.items():
        problem = _type_problem(key, value) if key in FIELD_TYPES else None
        if problem:
            return problem
    if not RUN_ID.fullmatch(row["run_id"]):
        return f"run_id {row['run_id'][:60]!r} is not a plain name of at most 200 letters, digits and _.+-"
    if row["status"] not in STATUSES:
        return f"status {row['status'][:40]!r} is not one of {', '.join(STATUSES)}"
    return None


def read_results(output_dir: str | Path) -> tuple[list[dict], list[str]]:
    """All valid rows, and a list of problems (malformed or invalid lines with file:line) that callers must
    surface."""
    return read_jsonl(Path(output_dir) / "results.jsonl", validate=row_problem)


class StepLog:
    """A run's JSONL step log. Lines are flushed as written; values are kept as they are (NaN stays NaN).
    `views` (dtype_bench.reporting: TensorBoard, W&B) receive every record written, after the line."""

    def __init__(self, path: str | Path, *, append: bool = False, resume_at: int | None = None,
                 views: Iterable = ()):
        """`resume_at`: a byte offset from `offset()`; the log is cut back to it (lines written after the
        checkpoint that recorded it are dropped, as a resumed run writes them again) and appended to."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at is not None:
            fd = open_no_link(self.path, os.O_RDWR | os.O_CREAT)
            try:
                size = os.fstat(fd).st_size
                if size < resume_at:
                    raise ValueError(f"step log {self.path} has {size} bytes, fewer than the {resume_at} its "
                                     "checkpoint recorded; pass --fresh to start over")
                os.ftruncate(fd, resume_at)
            finally:
                os.close(fd)
        keep = append or resume_at is not None
        fd = open_no_link(self.path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if keep else os.O_TRUNC))
        self._file: IO[str] = open(fd, "a" if keep else "w", encoding="utf-8")
        self.views = list(views)
        first_step = None
        if self.views and (append or resume_at is not None):
            kept, _ = read_jsonl(self.path)
            first_step = 1 + max((r["step"] for r in kept if isinstance(r.get("step"), int)), default=0)
        for view in self.views:
            view.open(first_step)  # a resumed view drops what it holds from first_step on, as the log did
        fsync_dir(self.path.parent)  # the log's directory entry, which fsyncing the file does not persist

    def write(self, record: dict) -> None:
        self._file.write(json_dumps(record) + "\n")
        self._file.flush()
        for view in self.views:
            view.write(record)

    def offset(self) -> int:
        """Bytes written so far, made durable first: a checkpoint records this offset, and after a power cut
        the log must still hold them for the resume to continue it."""
        os.fsync(self._file.fileno())
        return self._file.tell()

    def close(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
        for view in self.views:
            view.close()


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None below two values) and count of the values that are not None: the
    one mean/std over seeds (the sweep's table, analysis' estimates). NaN and Inf are kept and propagate."""
    xs = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(xs):
        return None, None, 0
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else None, len(xs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtype_bench.results",
                                     description="The results-row schema (ResultRow) as README's markdown table.")
    parser.add_argument("--readme", action="store_true", help=f"rewrite the schema section of {README} in place")
    args = parser.parse_args(argv)
    if not args.readme:
        print(schema_table())
        return 0
    README.write_text(readme_with_schema(README.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote the results schema into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
