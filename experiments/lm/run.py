"""Train GPT-2 from scratch (OpenWebText, or the offline synthetic corpus) under one precision config.

    python experiments/lm/run.py --config amp_bf16 --seed 0          # one run
    python experiments/lm/run.py --config all --seeds 3              # sweep, one process per run
    python experiments/lm/run.py --config core --preset tiny         # offline, CPU-sized

Reads top to bottom: data -> model under the precision config -> train loop -> evaluate -> row. The command
line, sweeps and the results schema are the classification experiment's (dtype_bench.runner), so the
analysis compares the two directly.
"""
from __future__ import annotations

import sys
from pathlib import Path


import torch
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from dtype_bench.experiments.lm import data as data_lib
from dtype_bench.experiments.lm import model as model_lib
from dtype_bench.experiments.lm.config import PRESETS, TrainConfig
from dtype_bench import (
    checkpoint, distributed, flops, precision, reporting, results, run_state, runner, signals, throughput,
)
from dtype_bench.diagnostics import PrecisionDiagnostics
from dtype_bench.memory import PeakMemory
from dtype_bench.monitor import TrainingMonitor
from dtype_bench.runner import UserError

EXPERIMENT = "lm"
METRICS = ("tokens_per_second", "samples_per_second", "peak_memory_gb", "val_loss", "perplexity")


def load_cache(cfg: TrainConfig) -> data_lib.CacheMeta:
    """The prepared token streams; the offline presets build their synthetic ones on first use (seconds)."""
    if cfg.preset != "full" and cfg.data_dir is None:
        from dtype_bench.experiments.lm.prepare_data import prepare_preset

        prepare_preset(cfg.preset, cfg.cache_dir)
    try:
        return data_lib.read_meta(cfg.cache_dir)
    except data_lib.CacheError as e:
        raise UserError(
            f"{e}. Prepare it with `python experiments/lm/prepare_data.py --source Skylion007/openwebtext "
            f"--tokenizer gpt2 --output_dir {cfg.cache_dir}`, or run offline with --preset tiny"
        ) from e


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens, cfg: TrainConfig, pc: precision.PrecisionConfig,
             device: torch.device) -> tuple[dict, dict]:
    """Mean next-token loss over the fixed validation windows, under the config's precision, and the dtypes
    checked on the first batch."""
    model.eval()
    total, n, dtypes = torch.zeros((), device=device), 0, None
    for batch in data_lib.eval_batches(tokens, cfg.block_size, cfg.eval_batch_size, cfg.eval_sequences):
        batch = batch.to(device)
        with precision.autocast(pc, device):
            logits = model(batch.input_ids)
        loss = model_lib.cross_entropy(logits, batch.targets, pc.loss_dtype)
        dtypes = dtypes or precision.check_dtypes(pc, model.body(), model.head, logits, loss=loss)
        total += loss * len(batch)
        n += len(batch)
    model.train()
    loss = total / n
    return {"loss": float(loss), "perplexity": float(torch.exp(loss))}, dtypes  # NaN/Inf stay as they are


def train_one(cfg: TrainConfig, pc: precision.PrecisionConfig, seed: int, meta: data_lib.CacheMeta,
              device: torch.device, rid: str) -> dict:
    """One run: returns the result fields (status, validation loss, timing, memory, dtypes)."""
    precision.apply_matmul_precision(pc)
    runner.seed_everything(seed)
    gpt2 = model_lib.build_gpt2(meta.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                block_size=cfg.block_size, dropout=cfg.dropout, eos_token_id=meta.eos_token_id)
    model = model_lib.CausalLM(gpt2, precision.head_autocast(pc, device))
    precision.cast_model(model.body(), model.head, pc)  # the head is the tied embedding matrix
    model.to(device).train()
    compiled = precision.should_compile(pc, device)  # the model; torchao's optimizer step follows the same flag
    forward = torch.compile(model) if compiled else model
    world = distributed.current_world()  # torchrun: DDP, each rank computing its share of every step
    forward = distributed.wrap(forward, world, device)
    local_accumulation = world.local_accumulation(cfg.gradient_accumulation_steps)
    optimizer = precision.build_optimizer(
        pc, model_lib.param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay, device=device)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps,
                                                            min_lr_rate=cfg.min_lr_ratio)
    scaler = precision.grad_scaler(pc, device)
    params = [p for p in model.parameters() if p.requires_grad]

    tokens = data_lib.open_splits(meta)  # pinned: a rebuild of the cache meanwhile does not change them
    batches = data_lib.TrainBatches(tokens["train"], cfg.block_size, cfg.batch_size, seed,
                                    rank=world.rank, world_size=world.world_size)
    val_tokens = tokens["val"]
    timer = throughput.StepTimer(device, warmup_steps=cfg.timing_warmup_steps)
    # FLOPs of one sequence: the LM head (tied embedding) runs at every position
    sample_flops = flops.flops_counter(gpt2.transformer, model.head, head_per_token=True)(cfg.block_size)
    peaks = flops.calibrate_peaks(device, pc.compute_dtype, tf32=pc.tf32, fp8=pc.fp8)  # one device's MFU denominators
    local_samples = cfg.batch_size * local_accumulation  # per step, this rank's: throughput and MFU are per device
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
        for micro in range(local_accumulation):  # this rank's share of the step's micro-batches
            batch = next(batches).to(device)
            # dropout masks depend on (seed, micro-batch) only: equal for any world size and after a resume
            distributed.reseed(seed, 0, world.micro_batch_index(state.step, micro, cfg.gradient_accumulation_steps))
            with distributed.gradient_sync(forward, sync=micro == local_accumulation - 1):
                with precision.autocast(pc, device):
                    logits = forward(batch.input_ids)
                loss = model_lib.cross_entropy(logits, batch.targets, pc.loss_dtype) / local_accumulation  # DDP avg
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
            dtypes = precision.check_dtypes(pc, model.body(), model.head, logits, optimizer, loss=loss, scaler=scaler)
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        step = state.step  # the step just done
        timer.stop(local_samples, local_samples * sample_flops)
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
                val, eval_dtypes = evaluate(model, val_tokens, cfg, pc, device)
            log.write({"step": step, "eval": "validation", **val, "weight_drift": diag.weight_drift()})
            state.evals.append({"step": step, **val})  # the LM reports its last evaluation, keeps no best weights
        stop = signals.stop_signal(world, sync_point=step % cfg.log_every == 0)  # SIGTERM/SIGINT received
        if stop:
            monitor.flush()  # a single process may stop between log steps: write its pending lines first
        if (evaluating or stop) and world.is_main:
            ckpt.save(optimizer, scheduler, scaler, progress=state.state_dict(), best_dir=None)
        if stop:
            raise signals.Interrupted(stop, step)
    progress.close()
    if not world.is_main:  # rank 0 evaluates and reports
        return {"status": status, "steps": state.step}
    log.close()
    speed = throughput.throughput_record(timer.summary(), peaks, world.world_size)
    samples_per_second = speed["samples_per_second"]
    out = {"status": status, "steps": state.step, "resumed_from_steps": state.resumed_from_steps,
           "skipped_steps": monitor.skipped_steps, "micro_batches": state.micro_batches,
           "samples_seen": state.micro_batches * cfg.batch_size,
           "tokens_seen": state.micro_batches * cfg.batch_size * cfg.block_size,
           "n_params": model_lib.count_parameters(model), "compiled": compiled,
           "optimizer_step_compiled": precision.compiles_optimizer_step(pc, device), "dtypes": dtypes,
           "eval_dtypes": eval_dtypes,
           "data": meta.raw["source"],  # what was trained on (kind synthetic-ids: the full shape on random ids)
           "train_wall_seconds": state.train_seconds, **speed, **diag.summary(),
           **memory.summary(),
           # every training sequence is exactly block_size tokens long
           "tokens_per_second": None if samples_per_second is None else samples_per_second * cfg.block_size}
    if status == "diverged":
        out.update(diverged_at_step=monitor.diverged_at, first_nonfinite_step=monitor.first_nonfinite_step)
        return out
    out.update(val_loss=state.evals[-1]["loss"], perplexity=state.evals[-1]["perplexity"],
               val_loss_curve=[[e["step"], e["loss"]] for e in state.evals])
    return out


def main(argv: list[str] | None = None) -> int:
    return runner.main(__file__, EXPERIMENT, TrainConfig, PRESETS, load_data=load_cache, train=train_one,
                       metrics=METRICS, description=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
