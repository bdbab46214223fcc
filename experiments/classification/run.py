"""Fine-tune an encoder + linear head on EUR-Lex multi-label classification under one precision config.

    python experiments/classification/run.py --config amp_bf16 --seed 0          # one run
    python experiments/classification/run.py --config all --seeds 3              # sweep, one process per run
    python experiments/classification/run.py --config core --preset tiny         # offline, CPU-sized

Reads top to bottom: parse -> data -> model under the precision config -> train loop -> evaluate -> row.
"""
from __future__ import annotations

import argparse
import copy
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules: config, data, model, metrics

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

import data as data_lib
import metrics as metrics_lib
import model as model_lib
from config import PRESETS, TrainConfig
from dtype_bench import precision, results, sweep, timing
from dtype_bench.configs import add_flags, resolve
from dtype_bench.io import fingerprint
from dtype_bench.monitor import TrainingMonitor

EXPERIMENT = "classification"


class UserError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, TrainConfig]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="precision config: a name, comma-separated names, 'core' or 'all'")
    parser.add_argument("--seed", type=int, default=0, help="seed of a single run; first seed of --seeds")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    add_flags(parser, TrainConfig, skip=("preset",))
    args = parser.parse_args(argv)
    try:
        cfg = resolve(TrainConfig, PRESETS, args.preset, args)
        configs = precision.resolve_names(args.config)
    except (ValueError, precision.UnknownConfig) as e:
        raise UserError(str(e)) from e
    if args.seeds <= 0:
        raise UserError(f"--seeds must be positive, got {args.seeds}")
    args.config_names = configs
    return args, cfg


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device} requested but CUDA is not available")
    return device


def load_cache(cfg: TrainConfig) -> data_lib.CacheMeta:
    """The prepared cache; the tiny preset builds its synthetic one on first use (seconds)."""
    if cfg.preset == "tiny" and cfg.data_dir is None:
        from prepare_data import prepare_tiny

        prepare_tiny(cfg.cache_dir)
    try:
        meta = data_lib.read_meta(cfg.cache_dir)
    except data_lib.CacheError as e:
        raise UserError(
            f"{e}. Prepare it with `python experiments/classification/prepare_data.py --source "
            f"<dataset.zip|folder|URL|hub id> --output_dir {cfg.cache_dir}`, or run offline with --preset tiny"
        ) from e
    if cfg.max_length > meta.max_length:
        raise UserError(f"--max_length {cfg.max_length} exceeds the cache's {meta.max_length}: prepare it again")
    return meta


def setup_of(cfg: TrainConfig, meta: data_lib.CacheMeta, device: torch.device) -> tuple[str, dict]:
    """Everything that makes runs comparable except config and seed."""
    setup = {k: v for k, v in cfg.to_record().items() if k not in ("output_dir", "device", "threads")}
    setup.update(data_fingerprint=meta.fingerprint, device_type=device.type)
    return fingerprint(setup), setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: data_lib.TokenizedSplit, cfg: TrainConfig,
             pc: precision.PrecisionConfig, meta: data_lib.CacheMeta, device: torch.device) -> dict:
    """Metrics on a split under the config's precision (or fp32 with --eval_precision fp32)."""
    if cfg.eval_precision == "fp32":
        model, pc = copy.deepcopy(model).float(), precision.get("fp32_baseline")
    model.eval()
    logits, losses = [], []
    for batch in data_lib.eval_batches(split, cfg.eval_batch_size, meta.num_labels, meta.pad_token_id,
                                       cfg.max_eval_docs):
        batch = batch.to(device)
        with precision.autocast(pc, device):
            out = model(batch.input_ids, batch.attention_mask)
        losses.append(model_lib.bce_loss_fp32(out, batch.targets) * len(batch))
        logits.append(out.float().cpu())
    model.train()
    n = sum(len(x) for x in logits)
    scores = metrics_lib.multilabel_metrics(
        torch.cat(logits), _targets(split, n, meta.num_labels), n_unseen_gold=split.n_unseen_labels[:n])
    scores["loss"] = float(torch.stack(losses).sum() / n)
    return scores


def _targets(split: data_lib.TokenizedSplit, n: int, num_labels: int) -> torch.Tensor:
    targets = torch.zeros((n, num_labels))
    for i in range(n):
        targets[i, torch.from_numpy(split.labels(i).astype(np.int64))] = 1.0
    return targets


def train_one(cfg: TrainConfig, pc: precision.PrecisionConfig, seed: int, meta: data_lib.CacheMeta,
              device: torch.device, rid: str) -> dict:
    """One run: returns the result fields (status, metrics, timing, memory, dtypes)."""
    precision.apply_matmul_precision(pc)
    seed_everything(seed)
    encoder = model_lib.build_encoder(cfg.model_name, vocab_size=meta.vocab_size, pad_token_id=meta.pad_token_id,
                                      max_length=cfg.max_length, tiny_layers=cfg.tiny_layers,
                                      tiny_hidden=cfg.tiny_hidden)
    model = model_lib.MultiLabelClassifier(encoder, meta.num_labels, cfg.dropout, pc, device.type)
    precision.cast_model(model.encoder, model.head, pc)
    model.to(device).train()
    compiled = precision.should_compile(pc, device)
    forward = torch.compile(model) if compiled else model
    optimizer = precision.build_optimizer(
        pc, model_lib.param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay, device=device)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    scaler = precision.grad_scaler(pc, device)
    params = [p for p in model.parameters() if p.requires_grad]

    train_split = data_lib.TokenizedSplit(meta.path, "train", cfg.max_length)
    val_split = data_lib.TokenizedSplit(meta.path, "validation", cfg.max_length)
    batches = data_lib.TrainBatches(train_split, cfg.batch_size, seed, meta.num_labels, meta.pad_token_id)
    log = results.StepLog(Path(cfg.output_dir) / "logs" / f"{rid}.jsonl")
    timer = timing.StepTimer(device, warmup_steps=cfg.timing_warmup_steps)
    timing.reset_peak_memory(device)

    monitor = TrainingMonitor(log, device, scaler, cfg.diverge_patience)
    step, micro_batches, dtypes, best, status = 0, 0, None, None, "completed"
    t_start = time.perf_counter()
    progress = tqdm(total=cfg.max_steps, desc=f"{pc.name} seed {seed}", unit="step", disable=None)
    while step < cfg.max_steps:
        timer.start()
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(batches).to(device)
            with precision.autocast(pc, device):
                logits = forward(batch.input_ids, batch.attention_mask)
            loss = model_lib.bce_loss_fp32(logits, batch.targets) / cfg.gradient_accumulation_steps
            scaler.scale(loss).backward()
            monitor.micro_batch(loss, logits)
            micro_batches += 1
        scaler.unscale_(optimizer)  # no-op unless loss scaling is on; clipping sees true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        scaler.step(optimizer)  # skips the update if the scaled gradients overflowed
        scaler.update()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()  # advances on skipped steps too, identically for every config
        if dtypes is None:
            dtypes = precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        timer.stop(cfg.effective_batch_size)
        monitor.step(step, grad_norm, lr)
        progress.update()
        if step % cfg.log_every == 0 or step % cfg.eval_steps == 0 or step == cfg.max_steps:
            timer.pause()  # the flush below is the loop's only host sync
            record = monitor.flush()
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            if monitor.diverged:
                status = "diverged"
                break
        if step % cfg.eval_steps == 0 or step == cfg.max_steps:
            val = evaluate(model, val_split, cfg, pc, meta, device)
            log.write({"step": step, "eval": "validation", **val})
            if best is None or val["micro_f1"] > best["metrics"]["micro_f1"]:
                best = {"step": step, "metrics": val,
                        "weights": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
    progress.close()
    log.close()
    train_seconds = time.perf_counter() - t_start
    out = {"status": status, "steps": step, "skipped_steps": monitor.skipped_steps, "micro_batches": micro_batches,
           "samples_seen": micro_batches * cfg.batch_size, "compiled": compiled, "dtypes": dtypes,
           "train_wall_seconds": train_seconds, **timer.summary(), **timing.peak_memory(device)}
    if status == "diverged":
        out.update(diverged_at_step=monitor.diverged_at, first_nonfinite_step=monitor.first_nonfinite_step)
        return out
    model.load_state_dict(best["weights"])
    test = evaluate(model, data_lib.TokenizedSplit(meta.path, "test", cfg.max_length), cfg, pc, meta, device)
    out.update(best_val_step=best["step"], **{f"val_{k}": v for k, v in best["metrics"].items()}, **test)
    return out


def run_single(args: argparse.Namespace, cfg: TrainConfig, meta: data_lib.CacheMeta, device: torch.device,
               setup_fp: str) -> int:
    pc = precision.get(args.config_names[0])
    rid = results.run_id(EXPERIMENT, pc.name, args.seed, setup_fp)
    row = {"experiment": EXPERIMENT, "run_id": rid, "config": pc.name, "seed": args.seed,
           "setup_fingerprint": setup_fp, "precision": pc.to_record(), "train_config": cfg.to_record(),
           "env": results.environment(device)}
    started = time.perf_counter()
    reason = precision.unsupported_reason(pc, device)
    exit_code = 0
    if reason:
        row.update(status="skipped", reason=reason)
        print(f"{pc.name}: skipped — {reason}")
    else:
        try:
            row.update(train_one(cfg, pc, args.seed, meta, device, rid))
        except Exception as e:  # one run's failure is a result, not a crash of the sweep
            traceback.print_exc()
            row.update(status="failed", error=f"{type(e).__name__}: {e}")
            exit_code = 1
    row["wall_seconds"] = time.perf_counter() - started
    results.append_result(cfg.output_dir, row)
    print(f"{rid}: {row['status']}" + "".join(
        f"  {k}={row[k]:.4g}" for k in results.SEED_METRICS if isinstance(row.get(k), (int, float))))
    return exit_code


def main(argv: list[str] | None = None) -> int:
    try:
        args, cfg = parse_args(argv)
        device = pick_device(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        meta = load_cache(cfg)
        setup_fp, setup = setup_of(cfg, meta, device)
        results.claim_output_dir(cfg.output_dir, setup_fp, setup)
    except (UserError, results.SetupMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(args.config_names) == 1 and args.seeds == 1:
        return run_single(args, cfg, meta, device, setup_fp)
    passthrough = sweep.strip_flags(sys.argv[1:] if argv is None else argv, ("--config", "--seed", "--seeds"))
    runs = sweep.grid(args.config_names, args.seed, args.seeds)
    return sweep.run_sweep(__file__, runs, passthrough, cfg.output_dir, setup_fp, EXPERIMENT)


if __name__ == "__main__":
    sys.exit(main())
