"""Fine-tune an encoder + linear head on EUR-Lex multi-label classification under one precision config.

    python experiments/classification/run.py --config amp_bf16 --seed 0          # one run
    python experiments/classification/run.py --config all --seeds 3              # sweep, one process per run
    python experiments/classification/run.py --config core --preset tiny         # offline, CPU-sized

Reads top to bottom: parse -> data -> model under the precision config -> train loop -> evaluate -> row.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from dtype_bench.experiments.classification import data as data_lib
from dtype_bench.experiments.classification import metrics as metrics_lib
from dtype_bench.experiments.classification import model as model_lib
from dtype_bench.experiments.classification.config import PRESETS, TrainConfig
from dtype_bench import (
    checkpoint, distributed, flops, precision, reporting, results, run_state, runner, signals, throughput,
)
from dtype_bench.diagnostics import PrecisionDiagnostics
from dtype_bench.memory import PeakMemory
from dtype_bench.monitor import TrainingMonitor
from dtype_bench.runner import UserError

EXPERIMENT = "classification"

def load_cache(cfg: TrainConfig) -> data_lib.CacheMeta:
    """The prepared cache; the offline presets build their synthetic one on first use (seconds)."""
    if cfg.preset != "full" and cfg.data_dir is None:
        from dtype_bench.experiments.classification.prepare_data import prepare_preset

        prepare_preset(cfg.preset, cfg.cache_dir)
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

@torch.no_grad()
def evaluate(model: torch.nn.Module, split: data_lib.TokenizedSplit, cfg: TrainConfig,
             pc: precision.PrecisionConfig, meta: data_lib.CacheMeta, device: torch.device) -> tuple[dict, dict]:
    """Metrics on a split under the config's precision (or fp32 with --eval_precision fp32), and the dtypes
    checked on its first batch."""
    eval_pc = precision.eval_precision(pc, cfg.eval_precision)
    model = precision.model_for_eval(model, pc, eval_pc)
    model.eval()
    logits, losses, dtypes = [], [], None
    for batch in data_lib.eval_batches(split, cfg.eval_batch_size, meta.num_labels, meta.pad_token_id,
                                       cfg.max_eval_docs):
        batch = batch.to(device)
        with precision.autocast(eval_pc, device):
            out = model(batch.input_ids, batch.attention_mask)
        loss = model_lib.bce_loss(out, batch.targets, eval_pc.loss_dtype)
        dtypes = dtypes or precision.check_dtypes(eval_pc, model.encoder, model.head, out, loss=loss)
        losses.append(loss * len(batch))
        logits.append(out.float().cpu())
    model.train()
    n = sum(len(x) for x in logits)
    scores = metrics_lib.multilabel_metrics(
        torch.cat(logits), _targets(split, n, meta.num_labels), n_unseen_gold=split.n_unseen_labels[:n])
    scores["loss"] = float(torch.stack(losses).sum() / n)
    return scores, dtypes

def _targets(split: data_lib.TokenizedSplit, n: int, num_labels: int) -> torch.Tensor:
    targets = torch.zeros((n, num_labels))
    for i in range(n):
        targets[i, torch.from_numpy(split.labels(i).astype(np.int64))] = 1.0
    return targets

def train_one(cfg: TrainConfig, pc: precision.PrecisionConfig, seed: int, meta: data_lib.CacheMeta,
              device: torch.device, rid: str) -> dict:
    """One run: returns the result fields (status, metrics, timing, memory, dtypes)."""
    precision.apply_matmul_precision(pc)
    runner.seed_everything(seed)
    encoder = model_lib.build_encoder(cfg.model_name, vocab_size=meta.vocab_size, pad_token_id=meta.pad_token_id,
                                      max_length=cfg.max_length, tiny_layers=cfg.tiny_layers,
                                      tiny_hidden=cfg.tiny_hidden)
    splits = data_lib.open_splits(meta, cfg.max_length)  # pinned: a cache rebuilt meanwhile does not change them
    train_split = splits["train"]
    label_prior = train_split.label_frequency(meta.num_labels) if cfg.head_bias_prior else None
    model = model_lib.MultiLabelClassifier(encoder, meta.num_labels, cfg.dropout,
                                           precision.head_autocast(pc, device), label_prior)
    precision.cast_model(model.encoder, model.head, pc)
    model.to(device).train()
    compiled = precision.should_compile(pc, device)  # the model; torchao's optimizer step follows the same flag
    forward = torch.compile(model) if compiled else model
    world = distributed.current_world()  # torchrun: DDP, each rank computing its share of every step
    forward = distributed.wrap(forward, world, device)
    local_accumulation = world.local_accumulation(cfg.gradient_accumulation_steps)
    optimizer = precision.build_optimizer(
        pc, model_lib.param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay, device=device)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    scaler = precision.grad_scaler(pc, device)
    params = [p for p in model.parameters() if p.requires_grad]

    val_split = splits["validation"]
    batches = data_lib.TrainBatches(train_split, cfg.batch_size, seed, meta.num_labels, meta.pad_token_id,
                                    rank=world.rank, world_size=world.world_size,
                                    length_grouped=cfg.length_grouped_batches)
    timer = throughput.StepTimer(device, warmup_steps=cfg.timing_warmup_steps)
    flops_of = flops.flops_counter(model.encoder, model.head, head_per_token=False)  # FLOPs/sample at a width
    peaks = flops.calibrate_peaks(device, pc.compute_dtype, tf32=pc.tf32, fp8=pc.fp8)  # one device's MFU denominators
    memory = PeakMemory(device)  # reset point: model and optimizer built; train and eval peaks apart

    diag = PrecisionDiagnostics(model, optimizer, model_lib.parameter_group_of, every=cfg.diagnostics_every)
    # Resume point: written at every evaluation and on SIGTERM/SIGINT (after diag, which keeps the initial weights)
    ckpt = checkpoint.RunCheckpoints(
        checkpoint.run_dir(cfg.output_dir, rid), model,
        identity={"run_id": rid, "config": pc.name, "seed": seed, "data_fingerprint": meta.fingerprint},
        record={"train_config": cfg.to_record(), "precision": pc.to_record()})
    resumed = ckpt.restore(optimizer, scheduler, scaler)  # None: no checkpoint, start at step 0
    log_path = Path(cfg.output_dir) / "logs" / f"{rid}.jsonl"
    log = results.StepLog(log_path, resume_at=resumed["log_offset"] if resumed else None,
                          views=reporting.views(cfg, pc, seed, rid, EXPERIMENT)) if world.is_main else None
    monitor = TrainingMonitor(log, device, scaler, cfg.diverge_patience, diag)
    state = run_state.RunState(batches=batches, monitor=monitor, diagnostics=diag, log=log, resumed=resumed)
    if resumed and world.is_main:
        print(f"resuming {rid} from step {state.step}", flush=True)
    dtypes, eval_dtypes, status = None, None, "completed"
    signals.defer_stop_signals()  # SIGTERM/SIGINT: checkpoint at the next step boundary, then stop
    progress = tqdm(total=cfg.max_steps, initial=state.step, desc=f"{pc.name} seed {seed}", unit="step",
                    disable=None if world.is_main else True)
    while state.step < cfg.max_steps:
        timer.start(timed=not diag.measures(state.step + 1))  # a diagnostics step does extra, untrained work
        step_samples, step_flops = 0, 0.0  # this rank's: throughput and MFU are per device
        for micro in range(local_accumulation):  # this rank's share of the step's micro-batches
            batch = next(batches).to(device)
            step_samples += len(batch)
            step_flops += flops_of(batch.input_ids.shape[1]) * len(batch)  # padded width: what is computed
            # dropout masks depend on (seed, micro-batch) only: equal for any world size and after a resume
            distributed.reseed(seed, 0, world.micro_batch_index(state.step, micro, cfg.gradient_accumulation_steps))
            with distributed.gradient_sync(forward, sync=micro == local_accumulation - 1):
                with precision.autocast(pc, device):
                    logits = forward(batch.input_ids, batch.attention_mask)
                loss = model_lib.bce_loss(logits, batch.targets, pc.loss_dtype) / local_accumulation  # DDP averages
                scaler.scale(loss).backward()
            monitor.micro_batch(loss, logits)
            state.micro_batches += world.world_size
        scaler.unscale_(optimizer)  # no-op unless loss scaling is on; clipping sees true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        diag.before_step()  # every diagnostics_every steps: fp32 shadow AdamW of the update about to happen
        distributed.reseed(seed, 1, state.step)  # stochastic rounding: the same noise on every rank and after a resume
        scaler.step(optimizer)  # skips the update if the scaled gradients overflowed
        diag.after_step()
        scaler.update()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()  # advances on skipped steps too, identically for every config
        if dtypes is None:
            dtypes = precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer, loss=loss, scaler=scaler)
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        step = state.step  # the step just done
        timer.stop(step_samples, step_flops)
        monitor.step(step, grad_norm, lr)
        progress.update()
        if step % cfg.log_every == 0 or step % cfg.eval_steps == 0 or step == cfg.max_steps:
            timer.pause()  # the flush below is the loop's only host sync
            record = monitor.flush({"samples_per_second": timer.recent_samples_per_second()})
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            if monitor.diverged:
                status = "diverged"
                break
        evaluating = step % cfg.eval_steps == 0 or step == cfg.max_steps
        if evaluating and world.is_main:
            with memory.evaluating():
                val, eval_dtypes = evaluate(model, val_split, cfg, pc, meta, device)
            log.write({"step": step, "eval": "validation", **val, "weight_drift": diag.weight_drift()})
            if state.best is None or val["micro_f1"] > state.best["metrics"]["micro_f1"]:
                state.best = {"step": step, "metrics": val, "dir": ckpt.save_best(step, val)}  # weights on disk
        stop = signals.stop_signal(world, sync_point=step % cfg.log_every == 0)  # SIGTERM/SIGINT received
        if stop:
            monitor.flush()  # a single process may stop between log steps: write its pending lines first
        if (evaluating or stop) and world.is_main:
            ckpt.save(optimizer, scheduler, scaler, progress=state.state_dict(), best_dir=state.best_dir)
        if stop:
            raise signals.Interrupted(stop, step)
    progress.close()
    if not world.is_main:  # rank 0 evaluates and reports
        return {"status": status, "steps": state.step}
    log.close()
    speed = throughput.throughput_record(timer.summary(), peaks, world.world_size)
    out = {"status": status, "steps": state.step, "resumed_from_steps": state.resumed_from_steps,
           "skipped_steps": monitor.skipped_steps, "micro_batches": state.micro_batches,
           "samples_seen": state.micro_batches * cfg.batch_size, "padding_fraction": batches.padding_fraction,
           "compiled": compiled, "optimizer_step_compiled": precision.compiles_optimizer_step(pc, device),
           "dtypes": dtypes, "eval_dtypes": eval_dtypes,
           "data": meta.raw["source"],  # what was trained on (kind synthetic-ids: the full shape on random ids)
           "train_wall_seconds": state.train_seconds, "eval_precision": cfg.eval_precision,
           **speed, **diag.summary()}
    if status == "diverged":
        out.update(diverged_at_step=monitor.diverged_at, first_nonfinite_step=monitor.first_nonfinite_step,
                   **memory.summary())
        return out
    ckpt.load_best(state.best_dir)
    with memory.evaluating():
        test, _ = evaluate(model, splits["test"], cfg, pc, meta, device)
    out.update(best_val_step=state.best["step"], **{f"val_{k}": v for k, v in state.best["metrics"].items()},
               **test, **memory.summary())
    return out

def main(argv: list[str] | None = None) -> int:
    return runner.main(__file__, EXPERIMENT, TrainConfig, PRESETS, load_data=load_cache, train=train_one,
                       metrics=results.SEED_METRICS, description=__doc__, argv=argv)

if __name__ == "__main__":
    sys.exit(main())
