"""The full-size device check: one offline command for any CUDA machine, the GPU numbers users need, most valuable first.

    python benchmarks/gpu_check.py --output_dir gpu_check --wheels wheels     # a CUDA machine, no network
    python benchmarks/gpu_check.py --output_dir /tmp/dry --dry_run            # same code path, tiny, CPU (*)

(*) Each run of the dry run trains in a second or two; the whole takes a few minutes on 2 cores, nearly all of
it the start-up (torch + transformers imports) of the processes it launches.

Nothing is downloaded. Throughput, MFU and memory do not depend on pretrained weights or real text, so the
check trains models of exactly the experiments' shapes built from configs (run.py's `synthetic_full` presets:
roberta-base + the 768 -> 4,271 head at seq 512, batch 8 x 4; GPT-2 124M at block 1,024, batch 12 x 5) on
random token ids at the real vocabulary sizes (prepare_data.py's `synthetic-ids` sources, written with numpy).
Every number comes from the project's own scripts, each run in its own process: experiments/*/run.py (the
results row: samples/s as the median over timing windows after warm-up, MFU against the measured and the
datasheet peak, train and eval peak memory allocated and reserved, static memory by tensor, warm-up seconds,
the timer's own check against the host clock, the SDPA ops that ran), benchmarks/vs_hf_trainer.py's Trainer
worker and benchmarks/loader.py.

Order: set-up first (`packages`: the optional wheels installed offline from --wheels; `data`: the caches), then
the runs in `VALUE_ORDER`, so that whatever cuts the check short, what matters most has been measured:
classification amp_bf16, its ratio to the Hugging Face Trainer, amp_fp16, bf16_sr_fp32_moments,
fp32_tf32_matmul, amp_bf16_fp8, fp32_baseline, the LM's amp_bf16; then the Trainer variant without its
per-micro-batch loss sync and the other Trainer configs, the rest of the registry, the LM's other configs, the
loader. `--configs` replaces the configs and keeps their order (classification, then Trainer, then LM).

Time: the check ends by its own deadline (`--deadline_s`, counted from process start, installation included;
9 minutes at full size). Each part has a budget (`--budget part=seconds,...`) and each run a cap
(`--run_timeout_s`). A run starts only if the time it is expected to need (the longest run of its part so far,
or the cap before any) is left in both its part's budget and the deadline; otherwise it is recorded as `not
run` with the seconds it needed and had. A run killed at its cap is `timeout`. Benchmark runs write no
checkpoints (`--checkpoints false`) and log once, at the last step, so the timed steps hold no pause.

Outputs in --output_dir, written after every run (a check killed at a limit still leaves its data): gpu_check.json
(everything, incl. device, driver, clocks before and after, versions) and gpu_check.md (the tables, also
printed), and runs/ (results rows and step logs). The caches go to --cache_dir (default in the temp folder).

Compatibility: only APIs present in torch 2.11 and transformers 5.17 as well as in the pinned versions (see
benchmarks/RESULTS.md); the check reports the versions it ran with.
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/gpu_check.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

import argparse
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import psutil
import torch

from benchmarks import loader, vs_hf_trainer, wheels
from dtype_bench import memory, precision, results, runner, synthetic
from dtype_bench.io import atomic_write_json, atomic_write_text, read_jsonl
from experiments.classification import config as cls_config
from experiments.classification import data as cls_data
from experiments.classification import model as cls_model

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
RUN = {"classification": EXPERIMENTS / "classification" / "run.py", "lm": EXPERIMENTS / "lm" / "run.py"}
PREPARE = {"classification": EXPERIMENTS / "classification" / "prepare_data.py",
           "lm": EXPERIMENTS / "lm" / "prepare_data.py"}
IMPORT_NAMES = {"torchao": "torchao", "bitsandbytes": "bitsandbytes", "torch-optimi": "optimi",
                "datasets": "datasets", "dill": "dill", "multiprocess": "multiprocess", "xxhash": "xxhash"}
"""pip name -> import name of every wheel in wheels.WHEELS (precision.unsupported_reason skips the configs whose
package is missing)."""
assert set(IMPORT_NAMES) == set(wheels.WHEELS)
PRESET = "synthetic_full"
"""Both experiments' run.py preset of the full shapes on synthetic token ids."""
PARTS = ("packages", "data", "classification", "trainer", "lm", "loader", "length_grouping")
DEFAULT_PARTS = PARTS[:-1]
"""length_grouping (two more cold compiles and a recompile per length) only when asked for with --parts."""
NO_NAN_FILTER = ":no_nan_inf_filter"
"""Suffix of a Trainer task run with logging_nan_inf_filter=False."""
VALUE_ORDER = (("classification", "amp_bf16"), ("trainer", "amp_bf16"), ("classification", "amp_fp16"),
               ("classification", "bf16_sr_fp32_moments"), ("classification", "fp32_tf32_matmul"),
               ("classification", "amp_bf16_fp8"), ("classification", "fp32_baseline"), ("lm", "amp_bf16"),
               ("trainer", "amp_bf16" + NO_NAN_FILTER), ("trainer", "fp32_baseline"), ("trainer", "amp_fp16"))
"""The runs users need most, first; the plan's other configs follow (`run_queue`)."""
ESTIMATE_MARGIN = 1.15
"""A run is expected to need this times the longest run of its part so far."""


@dataclass(frozen=True)
class Plan:
    """Sizes, step counts, configs and time limits of one check (`FULL` or `DRY_RUN`)."""

    name: str
    cls_data: tuple[str, ...]
    """prepare_data.py flags of the classification caches (the source is added per cache)."""
    cls_run: tuple[str, ...]
    """run.py flags of every classification run besides preset (PRESET), steps and data: overrides of the
    model shape and batch."""
    lm_data: tuple[str, ...]
    lm_run: tuple[str, ...]
    steps: int
    """Optimizer steps per classification and Trainer run: warm-up plus at least 3 timing windows of 10 steps."""
    lm_steps: int
    """Optimizer steps per LM run (a GPT-2 step is ~6x a classification step: 2 windows)."""
    warmup_steps: int
    """Steps excluded from timing at the start of each run (compilation, allocator warm-up)."""
    eval_docs: int
    """Validation and test documents evaluated per classification run (eval peak memory, eval under budget)."""
    loader_batches: int
    cls_configs: tuple[str, ...] | None
    """None: every config of precision.REGISTRY."""
    lm_configs: tuple[str, ...]
    trainer_configs: tuple[str, ...]
    grouping_config: str
    budgets: dict[str, float]
    """Part -> the most seconds its runs may take together."""
    run_timeout_s: float
    """At most this long for one training run (start-up and compilation included)."""
    deadline_s: float
    """The whole check ends within this many seconds of its process start, installation included."""
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
    steps=40, lm_steps=30, warmup_steps=10, eval_docs=64, loader_batches=500, cls_configs=None,
    lm_configs=precision.GROUPS["core"], trainer_configs=("amp_bf16", "fp32_baseline", "amp_fp16"),
    grouping_config="amp_bf16", run_timeout_s=90, deadline_s=540,
    budgets={"packages": 30, "data": 45, "classification": 330, "trainer": 200, "lm": 120, "loader": 15,
             "length_grouping": 150},
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
    steps=4, lm_steps=4, warmup_steps=1, eval_docs=8, loader_batches=20,
    # one config that trains and one this CPU must skip (float8 needs compute capability 8.9)
    cls_configs=("fp32_baseline", "amp_bf16_fp8"), lm_configs=("fp32_baseline",),
    trainer_configs=("fp32_baseline",), grouping_config="fp32_baseline", run_timeout_s=150, deadline_s=1500,
    budgets={"packages": 60, "data": 150, "classification": 300, "trainer": 300, "lm": 200, "loader": 60,
             "length_grouping": 300},
    threads=1,
)


def run_queue(plan: Plan, parts: list[str], configs: list[str] | None) -> list[tuple[str, str | None]]:
    """(part, config) in the order they run: `VALUE_ORDER` restricted to the plan's configs, then the rest of
    them; with `configs`, those in their given order (classification, Trainer, LM). Loader and length
    grouping last."""
    if configs:
        cls, lm = list(configs), list(configs)
        trainer = [c for c in configs if c in plan.trainer_configs or c in FULL.trainer_configs]
    else:
        cls, lm, trainer = list(plan.cls_configs or precision.REGISTRY), list(plan.lm_configs), list(
            plan.trainer_configs)
    wanted = {"classification": cls, "trainer": trainer + [c + NO_NAN_FILTER for c in trainer[:1]], "lm": lm}
    queue = [] if configs else [(p, c) for p, c in VALUE_ORDER if c in wanted[p]]
    queue += [(p, c) for p in ("classification", "trainer", "lm") for c in wanted[p] if (p, c) not in queue]
    queue += [("loader", None)] + [("length_grouping", g) for g in ("ungrouped", "grouped")]
    return [(p, c) for p, c in queue if p in parts]


# ---------------------------------------------------------------- running things


@dataclass
class Check:
    """One check in progress: where it writes, its plan, its time limits, and the report so far. Runs go to
    runs/ (runs-dry/ for a dry run: the two are different setups, which one results folder refuses to mix)."""

    output_dir: Path
    cache_dir: Path
    plan: Plan
    wheels: Path | None
    budgets: dict[str, float]
    run_timeout_s: float
    deadline: float
    """time.monotonic() at which the check must have ended."""
    report: dict = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)
    """Seconds each part has used so far."""
    longest: dict[str, float] = field(default_factory=dict)
    """The longest run of each part so far (what the next one is expected to need)."""

    def save(self) -> None:
        """gpu_check.json and gpu_check.md as they stand: a check cut short still leaves its results."""
        atomic_write_json(self.output_dir / "gpu_check.json", self.report)
        atomic_write_text(self.output_dir / "gpu_check.md", markdown(self.report))

    def runs_dir(self, name: str) -> Path:
        return self.output_dir / ("runs-dry" if self.plan is DRY_RUN else "runs") / name

    def left(self, part: str) -> float:
        """Seconds this part may still use: its budget's rest, within the check's deadline."""
        return min(self.budgets[part] - self.spent.get(part, 0.0), self.deadline - time.monotonic())

    def needed(self, part: str) -> float:
        return min(self.run_timeout_s, ESTIMATE_MARGIN * self.longest[part]) if part in self.longest \
            else self.run_timeout_s

    def why_not_start(self, part: str) -> str | None:
        """Why the next run of `part` does not start (not enough time left for what it is expected to need)."""
        needed, left = self.needed(part), self.left(part)
        if needed <= left:
            return None
        return (f"not started: expected to need ~{needed:.0f} s, {max(left, 0):.0f} s left in the {part} budget "
                "and the check's deadline")

    def run(self, part: str, command: list[str], timeout: float | None = None) -> dict:
        """A subprocess, killed with its whole process group (compile workers included) at `timeout` (the run
        cap by default) or what is left of the part: {returncode, wall_seconds, timed_out, limit, tail}."""
        limit = max(1.0, min(self.run_timeout_s if timeout is None else timeout, self.left(part)))
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
        seconds = time.perf_counter() - started
        self.spent[part] = self.spent.get(part, 0.0) + seconds
        if not timed_out:
            self.longest[part] = max(self.longest.get(part, 0.0), seconds)
        return {"returncode": child.returncode, "wall_seconds": seconds, "timed_out": timed_out, "limit": limit,
                "output": output, "tail": " | ".join(output.strip().splitlines()[-6:])}


def run_config(check: Check, part: str, experiment: str, config: str, out_dir: Path, flags: list[str]) -> dict:
    """One run.py run in its own process; the summary of its results row (or why there is none)."""
    proc = check.run(part, [sys.executable, str(RUN[experiment]), "--config", config, "--seed", "0", "--fresh",
                            "--output_dir", str(out_dir), *flags])
    rows, _ = read_jsonl(out_dir / "results.jsonl") if (out_dir / "results.jsonl").exists() else ([], [])
    row = next((r for r in reversed(rows) if r.get("config") == config), None)
    outside = {"wall_seconds_outside": round(proc["wall_seconds"], 2)}
    if proc["timed_out"]:
        return {"config": config, "status": "timeout", "error": f"killed at {proc['limit']:.0f} s: {proc['tail']}",
                **outside}
    if row is None:
        return {"config": config, "status": "failed", "error": proc["tail"], **outside}
    return {**summarize(row), **outside}


def summarize(row: dict) -> dict:
    """The check's fields of a results row."""
    keys = ("config", "status", "reason", "error", "samples_per_second", "samples_per_second_min",
            "samples_per_second_max", "timing_windows", "timed_steps", "tokens_per_second", "padding_fraction",
            "mfu", "mfu_datasheet", "peak_flops_measured", "peak_flops_datasheet", "peak_flops_dtype",
            "model_flops_per_sample", "train_peak_memory_gb", "train_peak_memory_reserved_gb",
            "eval_peak_memory_gb", "eval_peak_memory_reserved_gb", "peak_memory_kind", "compiled",
            "static_memory_bytes", "optimizer_8bit_params", "data", "wall_seconds", "warmup_seconds",
            "timer_check", "host_over_window_seconds", "paused_windows", "sdpa_ops")
    out = {k: row.get(k) for k in keys if row.get(k) is not None}
    max_length = (row.get("train_config") or {}).get("max_length")
    if out.get("tokens_per_second") is None and row.get("padding_fraction") == 0 and out.get("samples_per_second"):
        out["tokens_per_second"] = out["samples_per_second"] * max_length  # every batch is max_length wide
    return out


def not_run(config: str | None, reason: str) -> dict:
    return {"config": config, "status": "not run", "reason": reason}


# ---------------------------------------------------------------- set-up parts


def importable(module: str) -> bool:
    """Whether `module` can be found (whether it also imports, run.py finds out: a `skipped` reason)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses the name (a broken install, a hidden package)
        return False


def part_packages(check: Check) -> None:
    """Optional packages: present, installed from the wheel folder (offline, no dependencies: torch is never
    touched), or missing (the configs that need them are then skipped by run.py, with the reason)."""
    records = check.report.setdefault("packages", {})
    missing = [name for name, module in IMPORT_NAMES.items() if not importable(module)]
    for name in IMPORT_NAMES:
        if name not in missing:
            records[name] = f"present ({importlib.metadata.version(name)})"
    if missing and check.wheels is None:
        records.update({n: "missing (no wheel folder: pass --wheels DIR or put wheels in ./wheels)" for n in missing})
    elif missing:
        proc = check.run("packages", wheels.install_command(check.wheels, missing), timeout=check.budgets["packages"])
        importlib.invalidate_caches()
        for name in missing:
            records[name] = (f"installed from {check.wheels} ({importlib.metadata.version(name)})"
                             if importable(IMPORT_NAMES[name]) else
                             f"missing (install from {check.wheels} failed: {proc['tail'][-300:]})")
    check.save()


def cache_dir(check: Check, name: str) -> Path:
    return check.cache_dir / ("dry" if check.plan is DRY_RUN else "full") / name


CACHES = {"classification": ("classification", "synthetic-ids"),
          "classification_eurlex_lengths": ("classification", "synthetic-ids-eurlex-lengths"),
          "lm": ("lm", "synthetic-ids")}
"""Cache name -> (experiment, prepare_data.py source)."""
CACHES_OF_PARTS = {"classification": "classification", "trainer": "classification", "loader": "classification",
                   "length_grouping": "classification_eurlex_lengths", "lm": "lm"}


def part_data(check: Check) -> None:
    """The caches the selected parts read, through prepare_data.py (reused when already built)."""
    records = check.report.setdefault("data", {})
    needed = {CACHES_OF_PARTS[p] for p in check.report["parts"] if p in CACHES_OF_PARTS}
    for name, (experiment, source) in CACHES.items():
        if name not in needed:
            continue
        flags = check.plan.cls_data if experiment == "classification" else check.plan.lm_data
        proc = check.run("data", [sys.executable, str(PREPARE[experiment]), "--source", source,
                                  "--output_dir", str(cache_dir(check, name)), *flags], timeout=check.budgets["data"])
        records[name] = {"source": source, "flags": list(flags), "seconds": round(proc["wall_seconds"], 1),
                         "status": "ready" if proc["returncode"] == 0 else f"failed: {proc['tail'][-300:]}"}
        check.save()


# ---------------------------------------------------------------- the runs


def training_flags(check: Check, experiment: str, cache: str) -> list[str]:
    """run.py flags of a benchmark run: evaluation and its one log line at the last step (no pause inside the
    timed steps, so the timer's host-clock check covers them all), no checkpoints, no diagnostics."""
    plan = check.plan
    steps = plan.steps if experiment == "classification" else plan.lm_steps
    common = ["--preset", PRESET, "--data_dir", str(cache_dir(check, cache)), "--max_steps", str(steps),
              "--eval_steps", str(steps), "--log_every", str(steps), "--checkpoints", "false",
              "--timing_warmup_steps", str(plan.warmup_steps), "--diagnostics_every", "0",
              *(["--threads", str(plan.threads)] if plan.threads else [])]
    if experiment == "classification":
        return [*plan.cls_run, *common, "--max_eval_docs", str(plan.eval_docs)]
    return [*plan.lm_run, *common]


def run_training(check: Check, part: str, config: str) -> None:
    records = check.report.setdefault(part, [])
    why = check.why_not_start(part)
    records.append(not_run(config, why) if why else
                   run_config(check, part, part, config, check.runs_dir(part), training_flags(check, part, part)))


def run_trainer_side(check: Check, task: str) -> None:
    """The Hugging Face Trainer at the work of our classification run of the same config (same flags: model,
    batches, steps, warm-up, precision), in its own process; the ratio is ours / the Trainer's samples/s.
    `<config>:no_nan_inf_filter`: the Trainer without its per-micro-batch host read of the loss."""
    config, no_filter = task.removesuffix(NO_NAN_FILTER), task.endswith(NO_NAN_FILTER)
    records = check.report.setdefault("trainer", [])
    ours = next((r for r in check.report.get("classification", []) if r["config"] == config), {})
    record = {"config": config, "logging_nan_inf_filter": not no_filter, "ours": ours}
    why = check.why_not_start("trainer")
    if why:
        records.append({**record, "trainer": not_run(config, why)})
        return
    command = vs_hf_trainer.worker_command("trainer", config, 0, training_flags(check, "classification",
                                                                              "classification"),
                                           ("--no_nan_inf_filter",) if no_filter else ())
    proc = check.run("trainer", command)
    trainer = ({"status": "timeout", "error": f"killed at {proc['limit']:.0f} s"} if proc["timed_out"] else
               vs_hf_trainer.parse_result(proc["output"], proc["returncode"]))
    theirs, mine = trainer.get("samples_per_second"), ours.get("samples_per_second")
    flops, peak = ours.get("model_flops_per_sample"), (ours.get("peak_flops_datasheet"), ours.get("peak_flops_measured"))
    if theirs and flops:
        trainer.update(mfu_datasheet=theirs * flops / peak[0] if peak[0] else None,
                       mfu=theirs * flops / peak[1] if peak[1] else None)
    identical = trainer.get("status") == "completed" and ours.get("status") == "completed"
    records.append({**record, "trainer": trainer, "ratio": mine / theirs if identical and mine and theirs else None})


def part_loader(check: Check) -> None:
    """The loader alone at the classification runs' batch and length, against the fastest config's rate."""
    cfg = classification_config(check)
    device = runner.pick_device(cfg.device)
    started = time.perf_counter()
    rate = loader.measure(str(cache_dir(check, "classification")), batch_size=cfg.batch_size,
                          max_length=cfg.max_length, seed=0, n_batches=check.plan.loader_batches, device=device)
    check.spent["loader"] = check.spent.get("loader", 0.0) + time.perf_counter() - started
    rates = [(r["samples_per_second"], r["config"]) for r in check.report.get("classification", [])
             if r.get("samples_per_second")]
    record = {"micro_batches_per_second": rate, "batch_size": cfg.batch_size, "max_length": cfg.max_length}
    if rates:
        fastest, config = max(rates)
        record.update(fastest_config=config, headroom_line=loader.headroom_line(rate, fastest, cfg.batch_size),
                      headroom=rate / (fastest / cfg.batch_size), target=loader.TARGET_HEADROOM)
    check.report["loader"] = record


def run_length_grouping(check: Check, which: str) -> None:
    """amp_bf16 on EURLEX57K-like lengths with or without length-grouped batches (different batches, so a
    different setup: each in its own output folder)."""
    records = check.report.setdefault("length_grouping", [])
    config, grouped = check.plan.grouping_config, which == "grouped"
    why = check.why_not_start("length_grouping")
    if why:
        records.append({"length_grouped_batches": grouped, **not_run(config, why)})
        return
    flags = [*training_flags(check, "classification", "classification_eurlex_lengths"),
             "--length_grouped_batches", str(grouped).lower()]
    records.append({"length_grouped_batches": grouped,
                    **run_config(check, "length_grouping", "classification", config,
                                 check.runs_dir(f"eurlex_lengths_{which}"), flags)})


def run_task(check: Check, part: str, config: str | None) -> None:
    if part in ("classification", "lm"):
        run_training(check, part, config)
    elif part == "trainer":
        run_trainer_side(check, config)
    elif part == "loader":
        part_loader(check)
    else:
        run_length_grouping(check, config)


def classification_config(check: Check) -> cls_config.TrainConfig:
    """The training config run.py resolves for the classification runs (preset + the plan's overrides)."""
    _, cfg = runner.parse_args(None, cls_config.TrainConfig, cls_config.PRESETS,
                               ["--preset", PRESET, *check.plan.cls_run, "--config", "fp32_baseline"])
    return cfg


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
        predicted = memory.predicted_static_bytes(precision.get(record["config"]), shapes)
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


GPU_QUERY = ("name", "driver_version", "pstate", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
             "temperature.gpu", "power.draw", "power.limit")


def gpu_state() -> dict | None:
    """nvidia-smi's view of GPU 0 now (clocks in MHz, temperature in C, power in W), or None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--id=0", f"--query-gpu={','.join(GPU_QUERY)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-300:]}
    return dict(zip(GPU_QUERY, (v.strip() for v in out.stdout.strip().split(","))))


def environment() -> dict:
    cuda = torch.cuda.is_available()
    versions = {"python": platform.python_version(), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if cuda else None}
    for package in ("torch", "transformers", "accelerate", "tokenizers", "numpy", *IMPORT_NAMES):
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
    return {"device": device, "versions": versions, "gpu_before": gpu_state()}


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def timer_note(r: dict) -> str:
    """The timer's host-clock check of a run, in a table cell."""
    if not r.get("timer_check"):
        return "-"
    paused = f", {r['paused_windows']} pauses" if r.get("paused_windows") else ""
    return f"{r['timer_check']} ({r['host_over_window_seconds']:.3f}{paused})"


def training_table(records: list[dict]) -> list[str]:
    lines = ["| config | status | samples/s (min-max) | tokens/s | MFU datasheet | MFU measured peak | train peak "
             "alloc / reserved GB | eval peak alloc / reserved GB | windows | warm-up s | host/windows | wall s "
             "| note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        rate = (f"{fmt(r.get('samples_per_second'))} ({fmt(r.get('samples_per_second_min'))}-"
                f"{fmt(r.get('samples_per_second_max'))})" if r.get("samples_per_second") else "-")
        note = r.get("reason") or r.get("error") or ""
        lines.append(
            f"| {r['config']} | {r['status']} | {rate} | {fmt(r.get('tokens_per_second'), ',.0f')} | "
            f"{fmt(r.get('mfu_datasheet'), '.1%')} | {fmt(r.get('mfu'), '.1%')} | "
            f"{fmt(r.get('train_peak_memory_gb'))} / {fmt(r.get('train_peak_memory_reserved_gb'))} | "
            f"{fmt(r.get('eval_peak_memory_gb'))} / {fmt(r.get('eval_peak_memory_reserved_gb'))} | "
            f"{r.get('timing_windows', '-')} | {fmt(r.get('warmup_seconds'), '.0f')} | {timer_note(r)} | "
            f"{fmt(r.get('wall_seconds_outside'), '.0f')} | {note[:160]} |")
    return lines


def trainer_table(records: list[dict]) -> list[str]:
    lines = ["| config | Trainer loss sync per micro-batch | ours samples/s | Trainer samples/s | ours / Trainer | "
             "ours MFU datasheet | Trainer MFU datasheet | ours train peak GB | Trainer train peak GB | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ours, theirs = r["ours"], r["trainer"]
        note = "; ".join(f"{side}: {r[side].get('status')} {r[side].get('reason') or r[side].get('error') or ''}"
                         for side in ("ours", "trainer") if r[side].get("status") != "completed")
        lines.append(f"| {r['config']} | {'yes (default)' if r['logging_nan_inf_filter'] else 'no'} | "
                     f"{fmt(ours.get('samples_per_second'))} | {fmt(theirs.get('samples_per_second'))} | "
                     f"{fmt(r.get('ratio'), '.3f')} | {fmt(ours.get('mfu_datasheet'), '.1%')} | "
                     f"{fmt(theirs.get('mfu_datasheet'), '.1%')} | {fmt(ours.get('train_peak_memory_gb'))} | "
                     f"{fmt(theirs.get('peak_memory_gb'))} | {note[:200]} |")
    return lines


def gpu_line(state: dict | None, when: str) -> str:
    if not state:
        return f"GPU {when}: no nvidia-smi."
    if "error" in state:
        return f"GPU {when}: nvidia-smi failed ({state['error']})."
    return (f"GPU {when}: {state['name']}, driver {state['driver_version']}, {state['pstate']}, SM "
            f"{state['clocks.sm']} / max {state['clocks.max.sm']} MHz, memory {state['clocks.mem']} / max "
            f"{state['clocks.max.mem']} MHz, {state['temperature.gpu']} C, {state['power.draw']} / "
            f"{state['power.limit']} W.")


def markdown(report: dict) -> str:
    env, plan = report.get("environment", {}), report.get("plan", {})
    device, versions = env.get("device", {}), env.get("versions", {})
    sdpa = sorted({op for part in ("classification", "lm") for r in report.get(part, []) for op in r.get("sdpa_ops", [])})
    out = [f"# dtype-bench device check: {plan.get('name', '?')}", "",
           f"Device: {device.get('name')} ({device.get('type')}"
           + (f", compute capability {device['capability']}, {device['memory_gib']} GiB" if device.get("capability")
              else "") + "). Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
           gpu_line(env.get("gpu_before"), "before"), gpu_line(report.get("gpu_after"), "after"),
           f"Started {report.get('started')}; {fmt(report.get('elapsed_seconds'), '.0f')} s of the "
           f"{fmt(plan.get('deadline_s'), '.0f')} s deadline used (from process start, installation included). "
           f"Steps per run: classification and Trainer {plan.get('steps')}, LM {plan.get('lm_steps')}, the first "
           f"{plan.get('warmup_steps')} untimed; samples/s is the median over windows of 10 steps; warm-up s is "
           "the host time of the untimed steps (compilation included); host/windows is the host wall time of the "
           "timed steps between two device synchronizes over the sum of the timing windows ('agrees' within 5%). "
           "Data: random token ids (`synthetic-ids`), never EURLEX57K; quality numbers are meaningless and not "
           "shown.", "",
           "SDPA ops that ran (aten, profiled on the last warm-up step): " + (", ".join(sdpa) if sdpa else "none seen")
           + ".", "", "## Parts", "", "| part | status | seconds | budget s |", "|---|---|---|---|"]
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
    if report.get("trainer"):
        out += ["", "## Ours vs the Hugging Face Trainer (identical work: the same flags as our classification run)",
                "", "The Trainer's default `logging_nan_inf_filter=True` reads every micro-batch's loss on the host "
                "(one device sync per micro-batch); the row without it shows what that costs.", "",
                *trainer_table(report["trainer"])]
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
        out += ["", "Cut off by the time limits; to run it next:", *(f"    {c}" for c in report["next"])]
    return "\n".join(out) + "\n"


def next_commands(report: dict, output_dir: Path, dry_run: bool) -> list[str]:
    """The commands that run what the time limits cut off, per part, with its configs in order."""
    command = f"python benchmarks/gpu_check.py --output_dir {output_dir}-rest{' --dry_run' if dry_run else ''}"
    missing: dict[str, list[str]] = {}
    for part in ("classification", "lm"):
        missing[part] = [r["config"] for r in report.get(part, []) if r["status"] in ("not run", "timeout")]
    missing["trainer"] = [r["config"] for r in report.get("trainer", [])
                          if r["trainer"].get("status") in ("not run", "timeout")]
    out = [f"{command} --parts packages,data,{part} --configs {','.join(dict.fromkeys(configs))}"
           for part, configs in missing.items() if configs]
    if report.get("loader") is None and "loader" in report["parts"]:
        out.append(f"{command} --parts packages,data,loader")
    return out


def parse_budgets(spec: str | None, plan: Plan) -> dict[str, float]:
    budgets = dict(plan.budgets)
    for item in (s.strip() for s in (spec or "").split(",") if s.strip()):
        part, _, seconds = item.partition("=")
        if part not in budgets or not seconds.replace(".", "", 1).isdigit():
            raise ValueError(f"--budget takes part=seconds with part in {', '.join(PARTS)}; got {item!r}")
        budgets[part] = float(seconds)
    return budgets


def main(argv: list[str] | None = None) -> int:
    # the deadline counts from this process's start: imports and installation are part of the check's time
    process_start = time.monotonic() - (time.time() - psutil.Process().create_time())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, type=Path, help="where gpu_check.json/.md and runs/ go")
    parser.add_argument("--cache_dir", type=Path, default=Path(tempfile.gettempdir()) / "dtype_bench_gpu_check",
                        help="where the synthetic caches are built (reused when they match)")
    parser.add_argument("--wheels", type=Path, help="folder of the optional wheels (benchmarks/wheels.py download; "
                                                    "default: ./wheels if it exists); installed offline")
    parser.add_argument("--dry_run", action="store_true", help="the same code path at tiny sizes (CPU)")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--configs", help="precision configs of the classification, Trainer and LM runs, in this "
                                          "order (default: VALUE_ORDER, then the registry / the LM's core set)")
    parser.add_argument("--budget", help="part=seconds,... overriding the plan's part budgets")
    parser.add_argument("--run_timeout_s", type=float, help="cap of one run (default: the plan's)")
    parser.add_argument("--deadline_s", type=float, help="end of the whole check, seconds from process start "
                                                         "(default: the plan's)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    plan = DRY_RUN if args.dry_run else FULL
    wheel_dir = args.wheels or (ROOT / "wheels" if (ROOT / "wheels").is_dir() else None)
    if wheel_dir is not None and not wheel_dir.is_dir():
        parser.error(f"--wheels {wheel_dir} is not a folder")
    try:
        configs = precision.resolve_names(args.configs) if args.configs else None
        budgets = parse_budgets(args.budget, plan)
    except (precision.UnknownConfig, ValueError) as e:
        parser.error(str(e))
    if not args.dry_run and not torch.cuda.is_available():
        print("warning: no CUDA device; the full-size check on a CPU will mostly hit its time limits "
              "(use --dry_run for the CPU check)", file=sys.stderr)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    deadline_s = args.deadline_s or plan.deadline_s
    check = Check(args.output_dir, args.cache_dir, plan, wheel_dir, budgets, args.run_timeout_s or plan.run_timeout_s,
                  process_start + deadline_s)
    check.report.update(started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), dry_run=args.dry_run,
                        plan={**dataclasses.asdict(plan), "budgets": budgets, "run_timeout_s": check.run_timeout_s,
                              "deadline_s": deadline_s},
                        environment=environment(), parts={p: {"status": "not run", "budget": budgets[p]} for p in parts})
    started = time.monotonic()

    def finish_part(name: str, status: str, part_started: float) -> None:
        check.report["parts"][name].update(status=status, seconds=round(time.monotonic() - part_started, 1))
        check.report["elapsed_seconds"] = round(time.monotonic() - process_start, 1)
        check.save()

    for name, setup in (("packages", part_packages), ("data", part_data)):
        if name in parts:
            part_started = time.monotonic()
            print(f"[gpu_check] {name}: up to {check.left(name):.0f} s", flush=True)
            try:
                setup(check)
                status = "completed"
            except Exception as e:  # a part's own failure is a result; the runs still go on
                status = f"failed: {type(e).__name__}: {e}"
            finish_part(name, status, part_started)
    for part, config in run_queue(plan, parts, configs):
        task_started = time.monotonic()
        print(f"[gpu_check] {part} {config or ''}: {check.left(part):.0f} s left in the part, "
              f"{check.deadline - task_started:.0f} s to the deadline", flush=True)
        try:
            run_task(check, part, config)
            status = "completed"
        except Exception as e:  # one run's failure is a result; the next run still goes
            status = f"failed: {type(e).__name__}: {e}"
        seconds = check.report["parts"][part].get("seconds", 0.0) + time.monotonic() - task_started
        previous = check.report["parts"][part]["status"]
        check.report["parts"][part].update(status=status if previous in ("not run", "completed") else previous,
                                           seconds=round(seconds, 1))
        check.report["elapsed_seconds"] = round(time.monotonic() - process_start, 1)
        check.save()
    if "classification" in parts:
        static_memory_table(check)
    check.report["gpu_after"] = gpu_state()
    check.report["next"] = next_commands(check.report, args.output_dir, args.dry_run)
    check.report["elapsed_seconds"] = round(time.monotonic() - process_start, 1)
    check.save()
    print(markdown(check.report))
    print(f"[gpu_check] wrote {args.output_dir / 'gpu_check.md'} and {args.output_dir / 'gpu_check.json'} "
          f"in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
