"""The full-size device check: one offline command for any CUDA machine, every GPU number the project needs.

    python benchmarks/gpu_check.py --output_dir gpu_check                     # a CUDA machine, no network
    python benchmarks/gpu_check.py --output_dir gpu_check --wheels /path/to/wheels
    python benchmarks/gpu_check.py --output_dir /tmp/dry --dry-run           # same code path, tiny, CPU (*)

(*) Each run of the dry run trains in a second or two; the whole takes a few minutes on 2 cores, nearly all of
it the start-up (torch + transformers imports) of the dozen processes it launches.

Nothing is downloaded. Throughput, MFU and memory do not depend on pretrained weights or real text, so the
check trains models of exactly the experiments' shapes built from configs (run.py's `synthetic_full` presets:
roberta-base + the 768 -> 4,271 head at seq 512, batch 8 x 4; GPT-2 124M at block 1,024, batch 12 x 5) on
random token ids at the real vocabulary sizes (prepare_data.py's `synthetic-ids` sources). Every number comes
import sys
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/gpu_check.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

from the project's own scripts, each run in its own process: experiments/*/run.py (the results row: samples/s
as the median over timing windows after warm-up, MFU against the measured and the datasheet peak, train and
eval peak memory allocated and reserved, static memory by tensor), benchmarks/vs_hf_trainer.py's workers and
benchmarks/loader.py. A run that crashes, runs out of memory or overruns its time is recorded as such and the
check goes on; results are written after every run.

Parts, in order, with their time budgets at full size (`FULL.budgets`, 450 s in all: under the 8 minutes the
issue allows, leaving a device call time for a second try) and step counts:
  packages         10 s  torchao, bitsandbytes: present, or `pip install --no-index --no-deps` from the wheel
                         folder (--wheels DIR, or ./wheels); never the network, never torch
  data             35 s  the synthetic caches (prepare_data.py --source synthetic-ids...), reused when built
  classification  185 s  every config of the precision registry (core, then TF32 and fp8, then the rest; fp32
                         math last in each): 40 steps, 10 warm-up, so 3 timing windows of 10 steps; 64
                         validation + 64 test documents evaluated
  timer            60 s  the outside timer: whole amp_bf16 runs of N = 50 and 2N steps, difference / N
  lm               55 s  the LM's core configs, 30 steps, 10 warm-up
  trainer          60 s  ours vs the Hugging Face Trainer, fp32_baseline / amp_bf16 / amp_fp16, 30 steps, 10 warm-up
  length_grouping  35 s  amp_bf16 on EURLEX57K-like lengths, with and without length-grouped batches
  loader           10 s  the loader alone (500 micro-batches) against the fastest classification config
A part may use the time earlier parts left unused but never the time reserved for the parts after it, so the
check ends within the sum whatever happens; one training run gets at most 90 s (`run_timeout_s`). What a
budget cut off is recorded as `not run` or `timeout`, and the report ends with the commands that run it next
(`--parts`, `--configs`). Compilation is the unknown: each run compiles in its own process (torch.compile on
CUDA), with inductor's on-disk cache shared between runs.

Outputs in --output_dir: gpu_check.json (everything, incl. device and versions) and gpu_check.md (the tables,
also printed), plus runs/ (results rows and step logs; checkpoints are deleted after each run).

Compatibility: only APIs present in torch 2.11 and transformers 5.17 as well as in the pinned versions (see
benchmarks/RESULTS.md); the check reports the versions it ran with.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

import torch

from experiments.classification import config as cls_config
from experiments.classification import data as cls_data
from benchmarks import loader
from experiments.classification import model as cls_model
from benchmarks import vs_hf_trainer
from dtype_bench import precision, results, runner, synthetic
from dtype_bench.io import atomic_write_json, atomic_write_text, read_jsonl

EXPERIMENTS = ROOT / "experiments"
RUN = {"classification": EXPERIMENTS / "classification" / "run.py", "lm": EXPERIMENTS / "lm" / "run.py"}
PREPARE = {"classification": EXPERIMENTS / "classification" / "prepare_data.py",
           "lm": EXPERIMENTS / "lm" / "prepare_data.py"}
TRAINER_CONFIGS = ("fp32_baseline", "amp_bf16", "amp_fp16")
"""The configs the Trainer can run at identical work (vs_hf_trainer.py's default set)."""
OPTIONAL_PACKAGES = {"torchao": "torchao", "bitsandbytes": "bitsandbytes"}
"""pip name -> import name of the packages some configs need (precision.unsupported_reason skips those configs
when the package is missing)."""
PRESET = "synthetic_full"
"""Both experiments' run.py preset of the full shapes on synthetic token ids."""
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps 32-bit states for tensors with fewer elements (its optimizers' `min_8bit_size` default)."""
BNB_BLOCK = 256
"""bitsandbytes' block-wise quantisation: one float32 absmax per 256 elements per state."""


@dataclass(frozen=True)
class Plan:
    """Sizes, step counts, configs and time budgets of one check (`FULL` or `DRY_RUN`)."""

    name: str
    cls_data: tuple[str, ...]
    """prepare_data.py flags of the classification caches (the source is added per cache)."""
    cls_run: tuple[str, ...]
    """run.py flags of every classification run besides preset (PRESET), steps and data: overrides of the
    model shape and batch."""
    lm_data: tuple[str, ...]
    lm_run: tuple[str, ...]
    steps: int
    """Optimizer steps per classification run: warm-up plus at least 3 timing windows of 10 steps."""
    lm_steps: int
    """Optimizer steps per LM run (a GPT-2 step is ~6x a classification step: 2 windows)."""
    warmup_steps: int
    """Steps excluded from timing at the start of each run (compilation, allocator warm-up)."""
    trainer_steps: int
    trainer_warmup_steps: int
    timer_steps: int
    """N of the outside-timer check (runs of N and 2N steps)."""
    timer_config: str
    eval_docs: int
    """Validation and test documents evaluated per classification run (eval peak memory, eval under budget)."""
    loader_batches: int
    cls_configs: tuple[str, ...] | None
    """None: every config of precision.REGISTRY."""
    lm_configs: tuple[str, ...]
    trainer_configs: tuple[str, ...]
    grouping_config: str
    budgets: dict[str, float]
    """Part -> seconds (see PARTS); their sum is the check's deadline."""
    run_timeout_s: float
    """At most this long for one training run (start-up and compilation included), so that one run that hangs
    or crawls cannot take a whole part's budget from the configs after it."""
    threads: int | None = None


FULL = Plan(
    name="full size",
    cls_data=("--tokenizer", f"words:{synthetic.ROBERTA_BASE_VOCAB_SIZE}", "--max_length", "512",
              "--synthetic_docs", str(synthetic.FULL_SIZE_CLASSIFICATION_DOCS),
              "--synthetic_labels", str(synthetic.EURLEX_NUM_LABELS)),
    cls_run=(),
    lm_data=("--tokenizer", f"words:{synthetic.GPT2_VOCAB_SIZE}", "--synthetic_docs",
             str(synthetic.FULL_SIZE_LM_DOCS), "--val_fraction", "0.05"),
    lm_run=("--eval_sequences", "24"),
    steps=40, lm_steps=30, warmup_steps=10, trainer_steps=30, trainer_warmup_steps=10, timer_steps=50,
    timer_config="amp_bf16",
    eval_docs=64, loader_batches=500, cls_configs=None, lm_configs=precision.GROUPS["core"],
    trainer_configs=TRAINER_CONFIGS, grouping_config="amp_bf16",
    run_timeout_s=90,
    budgets={"packages": 10, "data": 35, "classification": 185, "timer": 60, "lm": 55, "trainer": 60,
             "length_grouping": 35, "loader": 10},
)
DRY_RUN = Plan(
    name="dry run (tiny sizes; not GPU numbers)",
    cls_data=("--tokenizer", "words:1000", "--max_length", "32", "--synthetic_docs", "300",
              "--synthetic_labels", "100"),
    cls_run=("--tiny_layers", "1", "--tiny_hidden", "64", "--max_length", "32",
             "--batch_size", "4", "--gradient_accumulation_steps", "1"),
    lm_data=("--tokenizer", "words:1000", "--synthetic_docs", "100", "--val_fraction", "0.1"),
    lm_run=("--n_layer", "1", "--n_head", "1", "--n_embd", "64", "--block_size",
            "32", "--batch_size", "4", "--gradient_accumulation_steps", "1", "--eval_sequences", "8"),
    steps=4, lm_steps=4, warmup_steps=1, trainer_steps=3, trainer_warmup_steps=1, timer_steps=2,
    timer_config="fp32_baseline",
    eval_docs=8, loader_batches=20,
    # one config that trains and one this CPU must skip (float8 needs compute capability 8.9)
    cls_configs=("fp32_baseline", "amp_bf16_fp8"), lm_configs=("fp32_baseline",),
    trainer_configs=("fp32_baseline",), grouping_config="fp32_baseline",
    run_timeout_s=120,
    budgets={"packages": 30, "data": 120, "classification": 120, "timer": 90, "lm": 60, "trainer": 90,
             "length_grouping": 90, "loader": 30},
    threads=1,
)


# ---------------------------------------------------------------- running things


@dataclass
class Check:
    """One check in progress: where it writes, its plan, its deadline, and the report so far. Runs go to
    runs/ (runs-dry/ for a dry run: the two are different setups, which one results folder refuses to mix)."""

    output_dir: Path
    plan: Plan
    wheels: Path | None
    configs: list[str] | None
    report: dict = field(default_factory=dict)
    part_deadline: float = math.inf

    def save(self) -> None:
        """gpu_check.json and gpu_check.md as they stand: a check cut short still leaves its results."""
        atomic_write_json(self.output_dir / "gpu_check.json", self.report)
        atomic_write_text(self.output_dir / "gpu_check.md", markdown(self.report))

    def runs_dir(self, name: str) -> Path:
        return self.output_dir / ("runs-dry" if self.plan is DRY_RUN else "runs") / name

    def remaining(self) -> float:
        return self.part_deadline - time.monotonic()

    def run(self, command: list[str], timeout: float | None = None) -> dict:
        """A subprocess, killed with its whole process group (compile workers included) at `timeout` or the
        part's deadline: {returncode, wall_seconds (outside timer), timed_out, tail of its output}."""
        limit = self.remaining() if timeout is None else min(timeout, self.remaining())
        if limit <= 1:
            return {"returncode": None, "wall_seconds": 0.0, "timed_out": True, "tail": "no time left in the budget"}
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            output, _ = child.communicate(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
            timed_out = True
        return {"returncode": child.returncode, "wall_seconds": time.perf_counter() - started, "timed_out": timed_out,
                "tail": " | ".join(output.strip().splitlines()[-6:])}


def run_config(check: Check, experiment: str, config: str, out_dir: Path, flags: list[str]) -> dict:
    """One run.py run in its own process; the summary of its results row (or why there is none)."""
    proc = check.run([sys.executable, str(RUN[experiment]), "--config", config, "--seed", "0", "--fresh",
                      "--output_dir", str(out_dir), *flags], timeout=check.plan.run_timeout_s)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # ~2 GB per full-size run; not needed here
    rows, _ = read_jsonl(out_dir / "results.jsonl") if (out_dir / "results.jsonl").exists() else ([], [])
    row = next((r for r in reversed(rows) if r.get("config") == config), None)
    outside = {"wall_seconds_outside": round(proc["wall_seconds"], 2)}
    if proc["timed_out"] or row is None:
        status = "timeout" if proc["timed_out"] else "failed"
        return {"config": config, "status": status, "error": proc["tail"], **outside}
    return {**summarize(row), **outside}


def summarize(row: dict) -> dict:
    """The check's fields of a results row."""
    keys = ("config", "status", "reason", "error", "samples_per_second", "samples_per_second_min",
            "samples_per_second_max", "timing_windows", "timed_steps", "tokens_per_second", "padding_fraction",
            "mfu", "mfu_datasheet", "peak_flops_measured", "peak_flops_datasheet", "peak_flops_dtype",
            "model_flops_per_sample", "train_peak_memory_gb", "train_peak_memory_reserved_gb",
            "eval_peak_memory_gb", "eval_peak_memory_reserved_gb", "peak_memory_kind", "compiled",
            "static_memory_bytes", "optimizer_8bit_params", "data", "wall_seconds")
    out = {k: row.get(k) for k in keys if row.get(k) is not None}
    max_length = (row.get("train_config") or {}).get("max_length")
    if out.get("tokens_per_second") is None and row.get("padding_fraction") == 0 and out.get("samples_per_second"):
        out["tokens_per_second"] = out["samples_per_second"] * max_length  # every batch is max_length wide
    return out


def not_run(config: str, part: str) -> dict:
    return {"config": config, "status": "not run", "reason": f"the {part} part's time budget ran out"}


# ---------------------------------------------------------------- the parts


def part_packages(check: Check) -> None:
    """Optional packages: present, installed from the wheel folder (offline, no dependencies: torch is never
    touched), or missing (the configs that need them are then skipped by run.py, with the reason)."""
    records = check.report.setdefault("packages", {})
    for pip_name, module in OPTIONAL_PACKAGES.items():
        if importlib.util.find_spec(module):  # whether it also imports, run.py finds out (a `skipped` reason)
            records[pip_name] = f"present ({importlib.metadata.version(pip_name)})"
            continue
        if check.wheels is None:
            records[pip_name] = "missing (no wheel folder: pass --wheels DIR or put wheels in ./wheels)"
            continue
        proc = check.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
                          str(check.wheels), pip_name])
        importlib.invalidate_caches()
        records[pip_name] = (f"installed from {check.wheels} ({importlib.metadata.version(pip_name)})"
                             if proc["returncode"] == 0 and importlib.util.find_spec(module)
                             else f"missing (install from {check.wheels} failed: {proc['tail'][-300:]})")
        check.save()


def cache_dir(check: Check, name: str) -> Path:
    return check.output_dir / "data" / name


CACHES = {"classification": ("classification", "synthetic-ids"),
          "classification_eurlex_lengths": ("classification", "synthetic-ids-eurlex-lengths"),
          "lm": ("lm", "synthetic-ids")}
"""Cache name -> (experiment, prepare_data.py source)."""
CACHES_OF_PARTS = {"classification": "classification", "timer": "classification", "trainer": "classification",
                   "loader": "classification", "length_grouping": "classification_eurlex_lengths", "lm": "lm"}


def part_data(check: Check) -> None:
    """The caches the selected parts read, through prepare_data.py (reused when already built)."""
    records = check.report.setdefault("data", {})
    needed = {CACHES_OF_PARTS[p] for p in check.report["parts"] if p in CACHES_OF_PARTS}
    for name, (experiment, source) in CACHES.items():
        if name not in needed:
            continue
        flags = check.plan.cls_data if experiment == "classification" else check.plan.lm_data
        proc = check.run([sys.executable, str(PREPARE[experiment]), "--source", source,
                          "--output_dir", str(cache_dir(check, name)), *flags])
        records[name] = {"source": source, "flags": list(flags), "seconds": round(proc["wall_seconds"], 1),
                         "status": "ready" if proc["returncode"] == 0 else f"failed: {proc['tail'][-300:]}"}
        check.save()


def training_flags(check: Check, experiment: str, cache: str, steps: int) -> list[str]:
    plan = check.plan
    common = ["--preset", PRESET, "--data_dir", str(cache_dir(check, cache)), "--max_steps", str(steps),
              "--eval_steps", str(steps),
              "--timing_warmup_steps", str(plan.warmup_steps), "--diagnostics_every", "0",
              *(["--threads", str(plan.threads)] if plan.threads else [])]
    if experiment == "classification":
        return [*plan.cls_run, *common, "--max_eval_docs", str(plan.eval_docs)]
    return [*plan.lm_run, *common]


def run_order(configs: list[str]) -> list[str]:
    """The most wanted numbers first, in case the budget runs out: the core configs, then TF32 and fp8 (which only
    a GPU can measure), then the rest; within each group, plain fp32 math last (the slowest: one that overruns
    leaves the others measured)."""
    core = set(precision.GROUPS["core"])

    def key(name: str) -> tuple[int, bool]:
        pc = precision.get(name)
        group = 0 if name in core else 1 if pc.tf32 or pc.fp8 else 2
        return group, pc.compute_dtype == torch.float32 and not pc.tf32

    return sorted(configs, key=key)


def part_training(check: Check, experiment: str) -> None:
    plan, records = check.plan, check.report.setdefault(experiment, [])
    if experiment == "classification":
        configs, steps = check.configs or plan.cls_configs or list(precision.REGISTRY), plan.steps
    else:
        configs, steps = check.configs or plan.lm_configs, plan.lm_steps
    flags = training_flags(check, experiment, experiment, steps)
    for config in run_order(list(configs)):
        records.append(run_config(check, experiment, config, check.runs_dir(experiment), flags)
                       if check.remaining() > 1 else not_run(config, experiment))
        check.save()


def part_timer(check: Check) -> None:
    """The project's timer against an outside one: wall time of whole run.py processes of N and 2N steps
    (same start-up, compilation, evaluation and checkpoint in both), difference / N = the time of N steps."""
    n, config = check.plan.timer_steps, check.plan.timer_config
    flags = lambda steps: training_flags(check, "classification", "classification", steps)  # noqa: E731
    if not any(r["config"] == config and r["status"] == "completed" for r in check.report.get("classification", [])):
        # nothing compiled this config yet: a discarded run first, so both timed runs find a warm compile cache
        run_config(check, "classification", config, check.runs_dir("timer_warm_up"), flags(n))
    runs = {steps: run_config(check, "classification", config, check.runs_dir(f"timer_{steps}_steps"), flags(steps))
            for steps in (n, 2 * n)}
    check.report["timer"] = timer_record(config, n, runs[n], runs[2 * n],
                                         classification_config(check).effective_batch_size)
    check.save()


def classification_config(check: Check) -> cls_config.TrainConfig:
    """The training config run.py resolves for the classification runs (preset + the plan's overrides)."""
    _, cfg = runner.parse_args(None, cls_config.TrainConfig, cls_config.PRESETS,
                               ["--preset", PRESET, *check.plan.cls_run, "--config", "fp32_baseline"])
    return cfg


def timer_record(config: str, n: int, short: dict, long: dict, samples_per_step: int) -> dict:
    record = {"config": config, "n_steps": n, "wall_seconds_n": short["wall_seconds_outside"],
              "wall_seconds_2n": long["wall_seconds_outside"], "samples_per_step": samples_per_step,
              "project_samples_per_second": long.get("samples_per_second"),
              "status": "completed" if short["status"] == long["status"] == "completed" else
              f"not comparable: runs {short['status']} / {long['status']}"}
    difference = long["wall_seconds_outside"] - short["wall_seconds_outside"]
    if record["status"] == "completed" and difference <= 0:
        record["status"] = (f"inconclusive: the {2 * n}-step run took no longer than the {n}-step one (process "
                            f"start-up varies by more than {n} steps take)")
    elif record["status"] == "completed":
        record["outside_samples_per_second"] = n * samples_per_step / difference
        if record["project_samples_per_second"]:
            record["outside_over_project"] = record["outside_samples_per_second"] / record["project_samples_per_second"]
    return record


def part_trainer(check: Check) -> None:
    """benchmarks/vs_hf_trainer.py's two workers per config at identical work (one round: ours, then the
    Trainer); its precision check says when the Trainer did not run the config."""
    plan, records = check.plan, check.report.setdefault("trainer", [])
    flags = vs_hf_trainer.measured_run_flags(
        PRESET, plan.trainer_steps, plan.trainer_warmup_steps, str(cache_dir(check, "classification")),
        [*plan.cls_run, *(["--threads", str(plan.threads)] if plan.threads else [])])
    for config in plan.trainer_configs:
        sides = {}
        for side in ("ours", "trainer"):
            sides[side] = (vs_hf_trainer.measure(side, config, 0, flags, timeout=min(plan.run_timeout_s,
                                                                                      check.remaining()))
                           if check.remaining() > 1 else not_run(config, "trainer"))
        ours, theirs = sides["ours"].get("samples_per_second"), sides["trainer"].get("samples_per_second")
        identical = sides["trainer"].get("status") == "completed"
        records.append({"config": config, "ours": sides["ours"], "trainer": sides["trainer"],
                        "ratio": ours / theirs if ours and theirs and identical else None})
        check.save()


def part_length_grouping(check: Check) -> None:
    """amp_bf16 on EURLEX57K-like lengths with and without length-grouped batches (different batches, so a
    different setup: each in its own output folder)."""
    records = check.report.setdefault("length_grouping", [])
    config = check.plan.grouping_config
    for grouped in (False, True):
        flags = [*training_flags(check, "classification", "classification_eurlex_lengths", check.plan.steps),
                 "--length_grouped_batches", str(grouped).lower()]
        out_dir = check.runs_dir(f"eurlex_lengths_{'grouped' if grouped else 'ungrouped'}")
        records.append({"length_grouped_batches": grouped, **run_config(check, "classification", config, out_dir,
                                                                        flags)})
        check.save()


def part_loader(check: Check) -> None:
    """The loader alone at the classification runs' batch and length, against the fastest config's rate."""
    cfg = classification_config(check)
    device = runner.pick_device(cfg.device)
    rate = loader.measure(str(cache_dir(check, "classification")), batch_size=cfg.batch_size,
                          max_length=cfg.max_length, seed=0, n_batches=check.plan.loader_batches, device=device)
    rates = [(r["samples_per_second"], r["config"]) for r in check.report.get("classification", [])
             if r.get("samples_per_second")]
    record = {"micro_batches_per_second": rate, "batch_size": cfg.batch_size, "max_length": cfg.max_length}
    if rates:
        fastest, config = max(rates)
        record.update(fastest_config=config, headroom_line=loader.headroom_line(rate, fastest, cfg.batch_size),
                      headroom=rate / (fastest / cfg.batch_size), target=loader.TARGET_HEADROOM)
    check.report["loader"] = record
    check.save()


PARTS: dict[str, Callable[[Check], None]] = {
    "packages": part_packages,
    "data": part_data,
    "classification": lambda check: part_training(check, "classification"),
    "timer": part_timer,
    "lm": lambda check: part_training(check, "lm"),
    "trainer": part_trainer,
    "length_grouping": part_length_grouping,
    "loader": part_loader,
}


# ---------------------------------------------------------------- static memory: predicted vs measured


def parameter_shapes(check: Check) -> dict[str, list[tuple[int, ...]]]:
    """Shapes of the classification model's parameters by dtype role ('body' / 'head'), built on the meta
    device from the same flags as the runs (no memory, no weights): the count the prediction starts from."""
    cfg = classification_config(check)
    meta = cls_data.read_meta(cache_dir(check, "classification"))
    with torch.device("meta"):
        encoder = cls_model.build_encoder(cfg.model_name, vocab_size=meta.vocab_size, pad_token_id=meta.pad_token_id,
                                          max_length=cfg.max_length, tiny_layers=cfg.tiny_layers,
                                          tiny_hidden=cfg.tiny_hidden)
        head = torch.nn.Linear(encoder.config.hidden_size, meta.num_labels)
    return {"body": [tuple(p.shape) for p in encoder.parameters()], "head": [tuple(p.shape) for p in head.parameters()]}


def predicted_static_bytes(pc: precision.PrecisionConfig, shapes: dict[str, list[tuple[int, ...]]]) -> dict:
    """Weights, gradients and AdamW moments (and Kahan compensation buffers) in bytes as the config's fields say
    they are allocated. Independent of the run: shapes x dtype sizes."""
    record = pc.to_record()
    dtype_of = {"body": record["weight_dtype"], "head": record["head_weight_dtype"] or record["weight_dtype"]}
    tensors = [(math.prod(shape), DTYPE_BYTES[dtype_of[role]]) for role, group in shapes.items() for shape in group]
    weights = sum(n * size for n, size in tensors)

    def state_bytes(n: int, weight_size: int) -> int:  # exp_avg + exp_avg_sq (+ Kahan compensation) of one tensor
        if pc.optimizer == "adamw_8bit":  # uint8 codes + a float32 absmax per block; small tensors stay 32-bit
            return 2 * (n + 4 * math.ceil(n / BNB_BLOCK)) if n >= BNB_MIN_8BIT_SIZE else 2 * n * 4
        moments = n * (DTYPE_BYTES[record["exp_avg_dtype"]] + DTYPE_BYTES[record["exp_avg_sq_dtype"]])
        return moments + (n * weight_size if pc.weight_update_rounding == "kahan" else 0)

    states = sum(state_bytes(n, size) for n, size in tensors)
    return {"weights": weights, "grads": weights, "optimizer_state": states, "parameters": sum(n for n, _ in tensors)}


def static_memory_table(check: Check) -> None:
    """Predicted (config fields x shapes) vs measured (the bytes of the tensors the run allocated, from its row)
    static memory per config, in bytes per parameter, next to the measured training peak."""
    try:
        shapes = parameter_shapes(check)
    except Exception as e:  # no cache (the data part failed): nothing to predict from
        check.report["static_memory"] = {"error": f"{type(e).__name__}: {e}"}
        return
    rows = []
    for record in check.report.get("classification", []):
        if record["config"] not in precision.REGISTRY:
            continue
        predicted = predicted_static_bytes(precision.get(record["config"]), shapes)
        measured = record.get("static_memory_bytes")
        row = {"config": record["config"], "status": record["status"],
               "train_peak_memory_gb": record.get("train_peak_memory_gb")}
        if predicted:
            n = predicted["parameters"]
            row["predicted_bytes_per_param"] = {k: predicted[k] / n for k in ("weights", "grads", "optimizer_state")}
            if measured:
                row["measured_bytes_per_param"] = {k: (measured.get(k) or {}).get("total", 0) / n
                                                   for k in ("weights", "grads", "optimizer_state")}
                total = lambda d: sum(d.values())  # noqa: E731
                row["measured_over_predicted"] = total(row["measured_bytes_per_param"]) / total(
                    row["predicted_bytes_per_param"])
        rows.append(row)
    check.report["static_memory"] = {"rows": rows, "order": peak_order(rows)}


def peak_order(rows: list[dict]) -> dict:
    """Pairs of configs whose measured training peaks are in the opposite order to their predicted static
    bytes per parameter (strictly larger prediction, smaller peak)."""
    known = [(sum(r["predicted_bytes_per_param"].values()), r["train_peak_memory_gb"], r["config"]) for r in rows
             if r.get("predicted_bytes_per_param") and r.get("train_peak_memory_gb")]
    inversions = [f"{a[2]} ({a[0]:.0f} B/param, {a[1]:.2f} GB) < {b[2]} ({b[0]:.0f} B/param, {b[1]:.2f} GB)"
                  for a in known for b in known if a[0] > b[0] and a[1] < b[1]]
    return {"configs_compared": len(known), "inversions": inversions}


# ---------------------------------------------------------------- report


def environment() -> dict:
    cuda = torch.cuda.is_available()
    versions = {"python": platform.python_version(), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if cuda else None}
    for package in ("torch", "transformers", "accelerate", "tokenizers", "numpy", *OPTIONAL_PACKAGES):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    device = {"type": "cuda" if cuda else "cpu", "cpu_count": os.cpu_count()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device.update(name=props.name, capability=f"{props.major}.{props.minor}",
                      memory_gib=round(props.total_memory / 2**30, 1), count=torch.cuda.device_count())
    else:
        device["name"] = results.cpu_name()
    return {"device": device, "versions": versions}


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def training_table(records: list[dict]) -> list[str]:
    lines = ["| config | status | samples/s (min-max) | tokens/s | MFU datasheet | MFU measured peak | train peak "
             "alloc / reserved GB | eval peak alloc / reserved GB | windows | wall s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        rate = (f"{fmt(r.get('samples_per_second'))} ({fmt(r.get('samples_per_second_min'))}-"
                f"{fmt(r.get('samples_per_second_max'))})" if r.get("samples_per_second") else "-")
        note = r.get("reason") or r.get("error") or ""
        lines.append(
            f"| {r['config']} | {r['status']} | {rate} | {fmt(r.get('tokens_per_second'), ',.0f')} | "
            f"{fmt(r.get('mfu_datasheet'), '.1%')} | {fmt(r.get('mfu'), '.1%')} | "
            f"{fmt(r.get('train_peak_memory_gb'))} / {fmt(r.get('train_peak_memory_reserved_gb'))} | "
            f"{fmt(r.get('eval_peak_memory_gb'))} / {fmt(r.get('eval_peak_memory_reserved_gb'))} | "
            f"{r.get('timing_windows', '-')} | {fmt(r.get('wall_seconds_outside'), '.0f')} | {note[:160]} |")
    return lines


def markdown(report: dict) -> str:
    env, plan = report.get("environment", {}), report.get("plan", {})
    device, versions = env.get("device", {}), env.get("versions", {})
    out = [f"# dtype-bench device check: {plan.get('name', '?')}", "",
           f"Device: {device.get('name')} ({device.get('type')}"
           + (f", compute capability {device['capability']}, {device['memory_gib']} GiB" if device.get("capability")
              else "") + "). Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
           f"Started {report.get('started')}; {fmt(report.get('elapsed_seconds'), '.0f')} s of the "
           f"{fmt(report.get('budget_seconds'), '.0f')} s budget used. Steps per run: classification "
           f"{plan.get('steps')}, LM {plan.get('lm_steps')}, Trainer comparison {plan.get('trainer_steps')}, the "
           f"first {plan.get('warmup_steps')} untimed (Trainer comparison: {plan.get('trainer_warmup_steps')}); "
           "samples/s is the median over windows of 10 steps. Data: random token ids (`synthetic-ids`), never "
           "EURLEX57K; quality numbers are meaningless and not shown.", "",
           "## Parts", "", "| part | status | seconds | budget s |", "|---|---|---|---|"]
    for name, part in report.get("parts", {}).items():
        out.append(f"| {name} | {part['status']} | {fmt(part.get('seconds'), '.0f')} | "
                   f"{fmt(part.get('budget'), '.0f')} |")
    if report.get("packages"):
        out += ["", "Optional packages: " + "; ".join(f"{k}: {v}" for k, v in report["packages"].items())]
    for key, title in (("classification", "Classification (roberta-base shape + 768 -> 4,271 head)"),
                       ("lm", "Language model (GPT-2 124M shape)")):
        if report.get(key):
            kinds = sorted({r["peak_memory_kind"] for r in report[key] if r.get("peak_memory_kind")})
            out += ["", f"## {title}", "", *training_table(report[key]),
                    *([f"\nPeak memory: {', '.join(kinds)}."] if kinds else [])]
    if report.get("timer"):
        t = report["timer"]
        out += ["", "## Outside timer (wall time of whole runs of N and 2N steps)", "",
                "| config | N | wall N s | wall 2N s | outside samples/s | project samples/s | outside / project |",
                "|---|---|---|---|---|---|---|",
                f"| {t['config']} | {t['n_steps']} | {fmt(t['wall_seconds_n'])} | {fmt(t['wall_seconds_2n'])} | "
                f"{fmt(t.get('outside_samples_per_second'))} | {fmt(t.get('project_samples_per_second'))} | "
                f"{fmt(t.get('outside_over_project'), '.3f')} |"]
        if t["status"] != "completed":
            out.append(f"\n{t['status']}")
    if report.get("trainer"):
        out += ["", "## Ours vs the Hugging Face Trainer (identical work, one round)", "",
                "| config | ours samples/s | Trainer samples/s | ratio | ours MFU datasheet | note |",
                "|---|---|---|---|---|---|"]
        for r in report["trainer"]:
            note = "; ".join(f"{side}: {r[side].get('status')} {r[side].get('reason') or r[side].get('error') or ''}"
                             for side in ("ours", "trainer") if r[side].get("status") != "completed")
            out.append(f"| {r['config']} | {fmt(r['ours'].get('samples_per_second'))} | "
                       f"{fmt(r['trainer'].get('samples_per_second'))} | {fmt(r.get('ratio'))} | "
                       f"{fmt(r['ours'].get('mfu_datasheet'), '.1%')} | {note[:200]} |")
    if report.get("length_grouping"):
        out += ["", "## Length-grouped batches (EURLEX57K-like lengths)", "",
                "| config | length-grouped | status | samples/s | padding | train peak alloc GB |",
                "|---|---|---|---|---|---|"]
        for r in report["length_grouping"]:
            out.append(f"| {r['config']} | {r['length_grouped_batches']} | {r['status']} | "
                       f"{fmt(r.get('samples_per_second'))} | {fmt(r.get('padding_fraction'), '.1%')} | "
                       f"{fmt(r.get('train_peak_memory_gb'))} |")
    if report.get("loader"):
        loader_record = report["loader"]
        out += ["", "## Loader", "", loader_record.get("headroom_line") or
                f"loader {loader_record['micro_batches_per_second']:,.0f} micro-batches/s (no training rate to "
                "compare with)"]
    static = report.get("static_memory") or {}
    if static.get("rows"):
        out += ["", "## Static memory: predicted (config fields x parameter shapes) vs measured (allocated tensors)",
                "", "| config | predicted B/param weights + grads + AdamW states | measured B/param | measured / "
                "predicted | train peak alloc GB |", "|---|---|---|---|---|"]
        for r in static["rows"]:
            parts = lambda d: " + ".join(f"{v:.2f}" for v in d.values()) if d else "-"  # noqa: E731
            out.append(f"| {r['config']} | {parts(r.get('predicted_bytes_per_param'))} | "
                       f"{parts(r.get('measured_bytes_per_param'))} | {fmt(r.get('measured_over_predicted'), '.3f')} | "
                       f"{fmt(r.get('train_peak_memory_gb'))} |")
        order = static["order"]
        out.append("\nTraining peaks against predicted static bytes/param ("
                   f"{order['configs_compared']} configs): "
                   + ("; ".join(order["inversions"]) if order["inversions"] else "no inversion") + ".")
    if report.get("next"):
        out += ["", "Cut off by the time budget; to run it next:", *(f"    {c}" for c in report["next"])]
    return "\n".join(out) + "\n"


def next_commands(report: dict, output_dir: Path, dry_run: bool) -> list[str]:
    """The commands that run what the budget cut off: classification configs not run, parts not reached."""
    command = f"python benchmarks/gpu_check.py --output_dir {output_dir}-rest{' --dry-run' if dry_run else ''}"
    missing = [r["config"] for r in report.get("classification", []) if r["status"] in ("not run", "timeout")]
    parts = [name for name, p in report["parts"].items() if p["status"] == "not run"]
    return ([f"{command} --parts packages,data,classification --configs {','.join(missing)}"] if missing else []) + (
        [f"{command} --parts packages,data,{','.join(parts)}"] if parts else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, type=Path, help="where gpu_check.json/.md and runs/ go")
    parser.add_argument("--wheels", type=Path, help="folder of wheels for the optional packages (default: ./wheels "
                                                      "if it exists); installed with pip --no-index --no-deps")
    parser.add_argument("--dry-run", action="store_true", help="the same code path at tiny sizes (CPU, seconds)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--configs", help="precision configs of the classification and LM parts (default: the "
                                          "registry for classification, core for the LM)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    plan = DRY_RUN if args.dry_run else FULL
    wheels = args.wheels or (ROOT / "wheels" if (ROOT / "wheels").is_dir() else None)
    if wheels is not None and not wheels.is_dir():
        parser.error(f"--wheels {wheels} is not a folder")
    try:
        configs = precision.resolve_names(args.configs) if args.configs else None
    except precision.UnknownConfig as e:
        parser.error(str(e))
    if not args.dry_run and not torch.cuda.is_available():
        print("warning: no CUDA device; the full-size check on a CPU will mostly hit its time budgets "
              "(use --dry-run for the CPU check)", file=sys.stderr)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    check = Check(args.output_dir, plan, wheels, configs)
    check.report.update(started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), dry_run=args.dry_run,
                        plan=dataclasses.asdict(plan), environment=environment(),
                        budget_seconds=sum(plan.budgets[p] for p in parts),
                        parts={p: {"status": "not run", "budget": plan.budgets[p]} for p in parts})
    started = time.monotonic()
    deadline = started + check.report["budget_seconds"]
    for i, name in enumerate(parts):
        # this part may use what earlier parts left, never the time reserved for the parts after it
        check.part_deadline = deadline - sum(plan.budgets[p] for p in parts[i + 1:])
        part_started = time.monotonic()
        print(f"[gpu_check] {name}: up to {check.remaining():.0f} s", flush=True)
        status = "completed"
        if check.remaining() <= 1:
            status = "not run"
        else:
            try:
                PARTS[name](check)
            except Exception as e:  # a part's own failure is a result; the next part still runs
                status = f"failed: {type(e).__name__}: {e}"
        check.report["parts"][name].update(status=status, seconds=round(time.monotonic() - part_started, 1))
        check.report["elapsed_seconds"] = round(time.monotonic() - started, 1)
        check.save()
    if "classification" in parts:
        static_memory_table(check)
    check.report["next"] = next_commands(check.report, args.output_dir, args.dry_run)
    check.report["elapsed_seconds"] = round(time.monotonic() - started, 1)
    check.save()
    print(markdown(check.report))
    print(f"[gpu_check] wrote {args.output_dir / 'gpu_check.md'} and {args.output_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
