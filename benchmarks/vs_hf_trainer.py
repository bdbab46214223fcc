"""Our classification training loop vs the Hugging Face Trainer, at identical work.

    python benchmarks/vs_hf_trainer.py --preset tiny                 # CPU: a few minutes
    python benchmarks/vs_hf_trainer.py --preset full --max_steps 60  # GPU: roberta-base, seq 512

Any other flag is a run.py flag and applies to both sides (e.g. --tiny_layers, --threads). On a CPU shared
with other work pass --threads 1: with more torch threads than free cores, OpenMP's waiting threads make step
times swing by an order of magnitude from run to run (benchmarks/RESULTS.md, "CPU notes").

Same work on both sides: the same model (built by experiments/classification/model.py from the same seed), the
same micro-batches in the same order (the Trainer gets the documents in our order, epoch after epoch, with
`train_sampling_strategy="sequential"`; tests/test_benchmarks.py checks batch for batch), batch size, gradient
accumulation, AdamW hyperparameters, weight decay groups (both exempt biases and LayerNorm), linear
warm-up/decay schedule, gradient clipping, loss (BCE-with-logits in the config's loss dtype, fp32) and precision
(the config's TF32 flags set as run.py sets them, `bf16`/`fp16` flags for autocast, GradScaler with fp16,
`adamw_bnb_8bit` for the 8-bit optimizer configs). The Trainer is set up
as a competent user would: dynamic padding (`DataCollatorWithPadding`), its default optimizer implementation,
no evaluation, no logging, no checkpoints. Configs the Trainer cannot express (low-precision master weights,
stochastic rounding, an fp32 head outside autocast, fp8) are listed as such, not approximated. After each
Trainer run the precision it really ran is checked (`precision_mismatch`: run.py's `check_dtypes` on its
model, last logits and loss, optimizer, GradScaler and the TF32 flags); a run that differs is measured but not
compared. This is how amp_fp16 on CPU shows up: there accelerate turns the `fp16` flag into neither autocast
nor loss scaling, so the Trainer trains in fp32.

Length-grouped batches (`--length_grouped_batches`, recorded, off by default because it changes the
data order) apply to both sides when passed as a run.py flag: still identical work. `--compare_length_grouping`
instead measures ours with them as a third side in the same alternating rounds, in its own columns (fewer
padded tokens computed, so not identical work and not part of the ratio); each side's `padding` column is the
share of computed token positions that were padding.

Same measurement on both sides: each run is its own process (no shared allocator or thread state), and
both are timed by the same `dtype_bench.throughput.StepTimer` at the same boundaries (start of an optimizer
step .. end of it, contiguous windows, the same warm-up steps excluded, median over windows): ours inside
run.py, the Trainer's through a callback (`on_step_begin` / `on_step_end`). Whole-process time (imports,
model build, evaluation) is excluded on both sides. Runs alternate (ours, Trainer, then Trainer, ours in
the next round) so drift in machine load hits every side; the table shows the median over rounds.

MFU uses model FLOPs per sample from our run (identical batches, so identical FLOPs) over the matmul peak
calibrated in our run's process (`dtype_bench.flops`). The Trainer lives here only, never in the training
path.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if not __package__:  # run as a file (python benchmarks/vs_hf_trainer.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

import numpy as np
import torch

from experiments.classification import data as data_lib
from benchmarks import loader
from experiments.classification import model as model_lib
from experiments.classification.config import PRESETS, TrainConfig
from dtype_bench import cpu, optimizers, precision, runner, throughput
from dtype_bench.configs import HelpFormatter
from dtype_bench.io import read_jsonl
from dtype_bench.memory import PeakMemory

# 8-bit AdamW (amp_*_8bit_adam) can be passed with --configs, but it is not identical work: the Trainer's
# adamw_bnb_8bit keeps nn.Embedding states in 32 bits (a bitsandbytes GlobalOptimManager override), ours does not.
DEFAULT_CONFIGS = "fp32_baseline,amp_bf16,amp_fp16"
RESULT_PREFIX = "RESULT "


# ---------------------------------------------------------------- the Trainer side


def trainer_precision_args(pc: precision.PrecisionConfig, device: torch.device) -> dict | str:
    """TrainingArguments that reproduce the config, or why the Trainer cannot express it (from the config's
    fields, never its name)."""
    if pc.weight_dtype != torch.float32:
        return "Trainer has no flag for low-precision master weights"
    if pc.head_weight_dtype is not None or pc.head_compute_fp32:
        return "Trainer has no flag for an output layer outside autocast"
    if pc.fp8:
        return "fp8 training is not a Trainer flag"
    if pc.autocast_dtype == torch.float16 and pc.loss_scaling == "none":
        return "Trainer's fp16 flag always scales the loss: no flag for fp16 autocast without loss scaling"
    optimizers = {"adamw": {}, "adamw_8bit": {"optim": "adamw_bnb_8bit"}}
    if pc.optimizer not in optimizers:
        return f"Trainer has no {pc.optimizer} optimizer"
    return {"bf16": pc.autocast_dtype == torch.bfloat16, "fp16": pc.autocast_dtype == torch.float16,
            "tf32": pc.tf32 if device.type == "cuda" else None, "torch_compile": precision.should_compile(pc, device),
            **optimizers[pc.optimizer]}


class TrainerModel(torch.nn.Module):
    """Our classifier behind the Trainer's calling convention: keyword inputs and labels -> {loss, logits}."""

    def __init__(self, classifier: model_lib.MultiLabelClassifier, loss_dtype: torch.dtype):
        super().__init__()
        self.classifier, self.loss_dtype = classifier, loss_dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.classifier(input_ids, attention_mask)
        loss = model_lib.bce_loss(logits, labels, self.loss_dtype)
        # their dtypes show the precision the Trainer really ran
        self.last_logits, self.last_loss = logits.detach(), loss.detach()
        return {"loss": loss, "logits": logits}


def precision_mismatch(trainer, pc: precision.PrecisionConfig, device: torch.device) -> str | None:
    """How the precision the Trainer actually ran differs from the config (None: identical), by the same
    `check_dtypes` as run.py: the dtypes it allocated and computed in, its loss scaling and the TF32 flags."""
    model = trainer.model
    scaler = trainer.accelerator.scaler or torch.amp.GradScaler(device.type, enabled=False)  # None: not scaled
    try:
        precision.check_dtypes(pc, model.classifier.encoder, model.classifier.head, model.last_logits,
                               getattr(trainer.optimizer, "optimizer", trainer.optimizer), loss=model.last_loss,
                               scaler=scaler)
    except precision.PrecisionMismatch as e:
        return str(e).removeprefix(f"{pc.name}: ")
    return None


class TrainingOrderDataset(torch.utils.data.Dataset):
    """The first `n_docs` documents of our training stream (`data.TrainBatches`: epoch after epoch, length-grouped
    or not), so a sequential sampler yields our exact micro-batches."""

    def __init__(self, split: data_lib.TokenizedSplit, cfg: TrainConfig, seed: int, num_labels: int, n_docs: int):
        self.split, self.num_labels = split, num_labels
        stream = data_lib.TrainBatches(split, cfg.batch_size, seed, num_labels, pad_token_id=0,  # never collated
                                       length_grouped=cfg.length_grouped_batches)
        self.order = np.concatenate([stream.next_indices() for _ in range(-(-n_docs // cfg.batch_size))])[:n_docs]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        doc = int(self.order[i])
        labels = np.zeros(self.num_labels, dtype=np.float32)
        labels[self.split.labels(doc)] = 1.0
        return {"input_ids": self.split.tokens(doc).astype(np.int64), "labels": labels}


def build_trainer(cfg: TrainConfig, pc: precision.PrecisionConfig, seed: int, device: torch.device,
                  output_dir: str, callbacks: list, nan_inf_filter: bool = True):
    """The Trainer as the benchmark runs it: our model, our micro-batches, the config's precision flags.
    `nan_inf_filter`: the Trainer's `logging_nan_inf_filter` (on by default), which reads every micro-batch's loss
    on the host (`torch.isnan(loss)` as a Python bool: one device sync per micro-batch); off, it syncs as rarely
    as it logs."""
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    meta = data_lib.read_meta(cfg.cache_dir)
    # as run.py does, per backend; the Trainer's `tf32` argument sets only torch's global default beneath these
    precision.apply_matmul_precision(pc)
    runner.seed_everything(seed)
    encoder = model_lib.build_encoder(cfg.model_name, vocab_size=meta.vocab_size, pad_token_id=meta.pad_token_id,
                                      max_length=cfg.max_length, tiny_layers=cfg.tiny_layers,
                                      tiny_hidden=cfg.tiny_hidden)
    train_split = data_lib.TokenizedSplit(meta.path, "train", cfg.max_length)
    label_prior = train_split.label_frequency(meta.num_labels) if cfg.head_bias_prior else None  # as run.py
    model = TrainerModel(model_lib.MultiLabelClassifier(encoder, meta.num_labels, cfg.dropout,
                                                        precision.head_autocast(pc, device), label_prior),
                         pc.loss_dtype)
    dataset = TrainingOrderDataset(train_split, cfg, seed, meta.num_labels, cfg.max_steps * cfg.effective_batch_size)
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="linear", max_grad_norm=cfg.grad_clip, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, adam_epsilon=optimizers.adam_eps_of(pc, cfg.adam_eps),
        train_sampling_strategy="sequential", logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, seed=seed, use_cpu=device.type == "cpu",
        logging_nan_inf_filter=nan_inf_filter,
        **trainer_precision_args(pc, device))
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks,
                   data_collator=DataCollatorWithPadding(AutoTokenizer.from_pretrained(meta.path / "tokenizer")))


def run_trainer(cfg: TrainConfig, pc: precision.PrecisionConfig, seed: int, device: torch.device,
                nan_inf_filter: bool = True) -> dict:
    """One Trainer run timed by our StepTimer; its training peak memory measured as ours is (`PeakMemory`, reset
    after the model is built)."""
    from transformers import TrainerCallback

    class TimingCallback(TrainerCallback):
        def __init__(self, timer: throughput.StepTimer):
            self.timer = timer

        def on_step_begin(self, args, state, control, **kwargs):
            self.timer.start()

        def on_step_end(self, args, state, control, **kwargs):
            self.timer.stop(cfg.effective_batch_size)

    if cfg.threads:  # as run.py does with --threads
        torch.set_num_threads(cfg.threads)
    timer = throughput.StepTimer(device, warmup_steps=cfg.timing_warmup_steps, last_step=cfg.max_steps)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(cfg, pc, seed, device, output_dir, [TimingCallback(timer)], nan_inf_filter)
        memory = PeakMemory(device)
        trainer.train()
        peaks = memory.summary()
    measured = {**timer.summary(), "peak_memory_gb": peaks["train_peak_memory_gb"],
                "train_peak_memory_reserved_gb": peaks.get("train_peak_memory_reserved_gb"),
                "logging_nan_inf_filter": nan_inf_filter}
    mismatch = precision_mismatch(trainer, pc, device)
    if mismatch:  # measured, but not the config: no ratio is computed from it
        return {"status": "not identical", "reason": f"its precision differs from the config: {mismatch}",
                **measured}
    return {"status": "completed", **measured}


# ---------------------------------------------------------------- our side


def run_ours(run_flags: list[str], config: str, seed: int) -> dict:
    """run.py's own main in this process; its results row carries the same StepTimer summary."""
    from experiments.classification import run as classification_run

    with tempfile.TemporaryDirectory() as output_dir:
        code = classification_run.main([*run_flags, "--config", config, "--seed", str(seed),
                                        "--output_dir", output_dir])
        rows, problems = read_jsonl(Path(output_dir) / "results.jsonl")
    if code != 0 or problems or not rows:
        raise SystemExit(f"run.py exited {code}: {problems or 'no results row'}")
    return rows[-1]


# ---------------------------------------------------------------- orchestration


def worker(argv: list[str]) -> int:
    """One measured run in this process: `--worker {ours,trainer} --config NAME -- RUN_FLAGS`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=("ours", "trainer"), required=True)
    parser.add_argument("--no_nan_inf_filter", action="store_true", help="trainer: logging_nan_inf_filter=False")
    parser.add_argument("--config", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args, run_flags = parser.parse_known_args(argv)
    run_flags = [f for f in run_flags if f != "--"]
    if args.worker == "ours":
        row = run_ours(run_flags, args.config, args.seed)
    else:
        _, cfg = runner.parse_args(None, TrainConfig, PRESETS, [*run_flags, "--config", args.config])
        row = run_trainer(cfg, precision.get(args.config), args.seed, runner.pick_device(cfg.device),
                          nan_inf_filter=not args.no_nan_inf_filter)
    keep = ("status", "error", "reason", "samples_per_second", "samples_per_second_min", "samples_per_second_max",
            "timing_windows", "timed_steps", "model_flops_per_sample", "peak_flops_measured", "mfu",
            "mfu_datasheet", "peak_memory_gb", "train_peak_memory_gb", "train_peak_memory_reserved_gb",
            "padding_fraction", "warmup_seconds", "timer_check", "host_over_window_seconds", "logging_nan_inf_filter")
    print(RESULT_PREFIX + json.dumps({k: row.get(k) for k in keep}))
    return 0


def worker_command(kind: str, config: str, seed: int, run_flags: list[str],
                   worker_flags: tuple[str, ...] = ()) -> list[str]:
    """The command of one measured run in its own process (`worker`)."""
    return [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *worker_flags, "--config", config,
            "--seed", str(seed), "--", *run_flags]


def parse_result(output: str, returncode: int) -> dict:
    """A worker's result from its output, or `failed` with the output's tail."""
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if returncode != 0 or not lines:
        return {"status": "failed", "error": " | ".join(output.strip().splitlines()[-5:])}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def measure(kind: str, config: str, seed: int, run_flags: list[str], timeout: float | None = None) -> dict:
    try:
        proc = subprocess.run(worker_command(kind, config, seed, run_flags), capture_output=True, text=True,
                              cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"not finished within {timeout:.0f} s"}
    return parse_result(proc.stdout + proc.stderr, proc.returncode)


def measured_run_flags(preset: str, max_steps: int, timing_warmup_steps: int, data_dir: str | None,
                       extra: list[str]) -> list[str]:
    """run.py flags of every measured run. Evaluation and logging happen once, at the last step (untimed); the
    timing windows of all sides then have identical boundaries."""
    return ["--preset", preset, "--max_steps", str(max_steps), "--eval_steps", str(max_steps),
            "--log_every", str(max_steps), "--max_eval_docs", "16", "--timing_warmup_steps", str(timing_warmup_steps),
            "--diagnostics_every", "0", *(["--data_dir", data_dir] if data_dir else []), *extra]


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, or '-' in the same width."""
    return format(value, spec) if value is not None else format("-", f">{spec.split('.')[0]}")


SIDES = {"ours": ("ours", []), "Trainer": ("trainer", []),
         "ours, length-grouped": ("ours", ["--length_grouped_batches", "true"])}
"""Measured side -> (worker, extra run flags)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        return worker(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="run.py preset of both sides")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated precision configs")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours/Trainer) per config")
    parser.add_argument("--max_steps", type=int, default=13, help="optimizer steps per run")
    parser.add_argument("--timing_warmup_steps", type=int, default=3, help="excluded steps at the start of each run")
    parser.add_argument("--seed", type=int, default=0, help="seed of model, data order and dropout")
    parser.add_argument("--data_dir", help="prepared cache (default: the preset's; tiny is built if missing)")
    parser.add_argument("--compare_length_grouping", action="store_true",
                        help="also measure ours with --length_grouped_batches in the same rounds: less "
                             "padding, but other batches, so not identical work (its own column, not the ratio)")
    parser.add_argument("--max_cpu_slowdown", default="4",
                        help="on a CPU, leave out configs whose fp16/bf16 matmuls measure more than this many times "
                             "slower than fp32 (emulated: e.g. amp_fp16 on most AMD CPUs, which the Trainer would "
                             "train in fp32 anyway); 'none' measures every config")
    args, extra = parser.parse_known_args(argv)
    configs = precision.resolve_names(args.configs)
    run_flags = measured_run_flags(args.preset, args.max_steps, args.timing_warmup_steps, args.data_dir,
                                   ["--max_cpu_slowdown", args.max_cpu_slowdown, *extra])
    _, cfg = runner.parse_args(None, TrainConfig, PRESETS, [*run_flags, "--config", configs[0]])
    if args.compare_length_grouping and cfg.length_grouped_batches:
        parser.error("--compare_length_grouping compares against ungrouped runs: drop --length_grouped_batches")
    sides = [side for side in SIDES if args.compare_length_grouping or side != "ours, length-grouped"]
    device = runner.pick_device(cfg.device)
    if args.preset != "full" and args.data_dir is None:
        from experiments.classification.prepare_data import prepare_preset

        prepare_preset(args.preset, cfg.cache_dir)

    results: dict[str, dict[str, list[dict]] | str] = {}  # config -> side -> runs, or why not compared
    for name in configs:
        pc = precision.get(name)
        trainer_args = trainer_precision_args(pc, device)  # or why the Trainer cannot express the config
        why_not = (precision.unsupported_reason(pc, device) or (trainer_args if isinstance(trainer_args, str) else None)
                   or cpu.too_slow_reason(pc, device, cfg.max_cpu_slowdown))
        if why_not:
            results[name] = why_not
            print(f"{name}: not compared — {why_not}", flush=True)
            continue
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):  # alternate: load drift hits every side
                kind, side_flags = SIDES[side]
                result = measure(kind, name, args.seed, [*run_flags, *side_flags])
                runs[side].append(result)
                print(f"{name} round {r + 1} {side:21s}: {fmt(result.get('samples_per_second'), '.2f')} samples/s"
                      + (f"  [{result['status']}: {result.get('error') or result.get('reason')}]"
                         if result.get("status") != "completed" else ""), flush=True)
        results[name] = runs

    threads = cfg.threads or "torch default"
    print(f"\nours vs Hugging Face Trainer, preset {args.preset}, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'threads: {threads}'}), "
          f"length-grouped batches: {'on (both sides)' if cfg.length_grouped_batches else 'off'}, "
          f"median over {args.rounds} alternating rounds; samples/s = median over timing windows after "
          f"{args.timing_warmup_steps} warm-up steps; padding = share of computed token positions that are padding")
    grouped_header = f" {'grouped samples/s':>18s} {'grouped padding':>16s}" if args.compare_length_grouping else ""
    width = max([len("config"), *map(len, results)])  # the config column fits the longest name
    header = (f"{'config':{width}s} {'ours samples/s':>15s} {'Trainer samples/s':>18s} {'ratio':>6s} {'ours MFU':>9s} "
              f"{'Trainer MFU':>12s} {'padding':>8s}" + grouped_header)
    print(header + "\n" + "-" * len(header))
    for name, runs in results.items():
        if isinstance(runs, str):
            print(f"{name:{width}s} not expressible: {runs}")
            continue
        rate = {side: median_of([r for r in side_runs if r.get("status") == "completed"], "samples_per_second")
                for side, side_runs in runs.items()}
        not_identical = {r["reason"] for r in runs["Trainer"] if r.get("status") == "not identical"}
        flops, peak = median_of(runs["ours"], "model_flops_per_sample"), median_of(runs["ours"], "peak_flops_measured")
        mfu = lambda r: r * flops / peak if r and flops and peak else None  # noqa: E731
        ratio = rate["ours"] / rate["Trainer"] if rate["ours"] and rate["Trainer"] else None
        grouped = (f" {fmt(rate['ours, length-grouped'], '18.2f')} "
                   f"{fmt(median_of(runs['ours, length-grouped'], 'padding_fraction'), '16.1%')}"
                   if args.compare_length_grouping else "")
        print(f"{name:{width}s} {fmt(rate['ours'], '15.2f')} {fmt(rate['Trainer'], '18.2f')} {fmt(ratio, '6.2f')} "
              f"{fmt(mfu(rate['ours']), '9.2%')} {fmt(mfu(rate['Trainer']), '12.2%')} "
              f"{fmt(median_of(runs['ours'], 'padding_fraction'), '8.1%')}" + grouped)
        for reason in sorted(not_identical):
            trainer_rate = median_of(runs["Trainer"], "samples_per_second")
            print(f"{'':{width}s} ^ Trainer not compared ({fmt(trainer_rate, '.2f')} samples/s measured): {reason}")

    fastest = max((r for runs in results.values() if not isinstance(runs, str)
                   for r in [median_of(runs["ours"], "samples_per_second")] if r), default=None)
    if fastest:
        meta = data_lib.read_meta(cfg.cache_dir)
        rate = loader.measure(cfg.cache_dir, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=args.seed,
                              n_batches=500, device=device, length_grouped=cfg.length_grouped_batches)
        print("\n" + loader.headroom_line(rate, fastest, cfg.batch_size) + f" [{meta.path}, fastest config]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
