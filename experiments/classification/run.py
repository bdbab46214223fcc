"""Fine-tune an encoder + linear head on EUR-Lex multi-label classification under one precision config.

    python experiments/classification/run.py --config amp_bf16 --seed 0          # one run
    python experiments/classification/run.py --config all --seeds 3              # sweep, one process per run
    python experiments/classification/run.py --config core --preset tiny         # offline, CPU-sized

Reads top to bottom: data -> model under the precision config -> train loop -> evaluate -> row; `main` at the
end: parse -> plan or claim the output folder -> data -> one run under its gate, or a sweep.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

if not __package__:  # run as a file (python experiments/classification/run.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from experiments.classification import data as data_lib
from experiments.classification import metrics as metrics_lib
from experiments.classification import model as model_lib
from experiments.classification.config import PRESETS, TrainConfig
from dtype_bench import cpu, distributed, flops, loop, optimizers, plan, precision, progress, results, runner, sweep
from dtype_bench.io import claim_folder
from dtype_bench.runner import UserError

PRELOAD = ["experiments.classification.run", "transformers.models.roberta.modeling_roberta"]
"""What a sweep's forkserver imports once for all its runs (transformers loads the model's module lazily)."""
EXPERIMENT = "classification"

def encoder_config(cfg: TrainConfig):
    """A pretrained encoder's config (None for --model_name tiny); one line saying what to pass if it cannot be
    loaded (a hub id offline, a path that does not exist)."""
    if cfg.model_name == "tiny":
        return None
    try:
        return model_lib.pretrained_config(cfg.model_name)
    except model_lib.EncoderNotFound as e:
        raise UserError(str(e)) from e

def load_cache(cfg: TrainConfig) -> data_lib.CacheMeta:
    """The prepared cache (the offline presets build their synthetic one on first use, seconds), and checks that
    a pretrained encoder's config can be loaded and covers the cache's tokens: before a preset's cache is built
    (nothing is written for a bad --model_name), else after the cache is found (a missing cache is said first)."""
    builds = cfg.preset != "full" and cfg.data_dir is None
    encoder = encoder_config(cfg) if builds else None
    if builds:
        from experiments.classification.prepare_data import prepare_preset

        prepare_preset(cfg.preset, cfg.cache_dir)
    try:
        meta = data_lib.read_meta(cfg.cache_dir)
    except data_lib.CacheError as e:
        raise UserError(
            f"{e}. Prepare it with `python experiments/classification/prepare_data.py --source "
            f"<dataset.zip|folder|URL|hub id> --output_dir {cfg.cache_dir}`, or run offline with --preset tiny"
        ) from e
    encoder = encoder or encoder_config(cfg)
    if encoder is not None and meta.vocab_size > encoder.vocab_size:
        raise UserError(f"the cache's tokenizer has {meta.vocab_size} tokens, --model_name {cfg.model_name} only "
                        f"{encoder.vocab_size}: prepare the cache with the model's tokenizer")
    if cfg.init_weights and not Path(cfg.init_weights).is_file():
        raise UserError(f"--init_weights {cfg.init_weights}: no such file (a run's checkpoints/<run id>/best-step*/"
                        "model.safetensors)")
    if cfg.max_length > meta.max_length:
        raise UserError(f"--max_length {cfg.max_length} exceeds the cache's {meta.max_length}: prepare it again")
    return meta

@torch.no_grad()
def evaluate(model: torch.nn.Module, split: data_lib.TokenizedSplit, cfg: TrainConfig,
             pc: precision.PrecisionConfig, meta: data_lib.CacheMeta, device: torch.device) -> tuple[dict, dict]:
    """Metrics on a split under the config's precision (or fp32 with --eval_precision fp32), and the dtypes
    checked on its first batch. `model` is the uncompiled module: evaluation batches (another batch size, a short
    last batch) would each compile a graph, and their speed is not what a run measures."""
    eval_pc = precision.eval_precision(pc, cfg.eval_precision)
    model = precision.model_for_eval(model, pc, eval_pc)
    model.eval()
    logits, losses, dtypes = [], [], None
    docs = len(split) if cfg.max_eval_docs is None else min(cfg.max_eval_docs, len(split))
    emulated = cpu.emulates_matmuls(eval_pc, device, cfg.max_cpu_slowdown, cfg.emulate_slow_matmuls)
    for batch in progress.track(data_lib.eval_batches(split, cfg.eval_batch_size, meta.num_labels, meta.pad_token_id,
                                                      cfg.max_eval_docs),
                                f"{pc.name} evaluation", total=-(-docs // cfg.eval_batch_size)):
        batch = batch.to(device)
        with precision.autocast(eval_pc, device), cpu.matmul_emulation(emulated):
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
              device: torch.device, rid: str) -> results.ResultRow:
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
    init_sha256 = model_lib.load_classifier_weights(model, cfg.init_weights) if cfg.init_weights else None
    precision.cast_model(model.encoder, model.head, pc)
    model.to(device).train()
    emulated = cpu.emulates_matmuls(pc, device, cfg.max_cpu_slowdown, cfg.emulate_slow_matmuls)  # quality only
    # the model, eager under emulation (torchao's step: the config's)
    compiled = cfg.compile_model and precision.should_compile(pc, device) and not emulated
    forward = torch.compile(model) if compiled else model
    world = distributed.current_world()  # torchrun: DDP, each rank computing its share of every step
    forward = distributed.wrap(forward, world, device)
    optimizer = optimizers.build_optimizer(
        pc, model_lib.param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay, device=device)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    scaler = precision.grad_scaler(pc, device)
    params = [p for p in model.parameters() if p.requires_grad]

    batches = data_lib.TrainBatches(train_split, cfg.batch_size, seed, meta.num_labels, meta.pad_token_id,
                                    rank=world.rank, world_size=world.world_size,
                                    length_grouped=cfg.length_grouped_batches)
    flops_of = flops.flops_counter(model.encoder, model.head, head_per_token=False)  # FLOPs/sample at a width
    run = loop.TrainingRun(model, optimizer, scheduler, scaler, cfg=cfg, pc=pc, seed=seed, run_id=rid,
                           experiment=EXPERIMENT, device=device, world=world, batches=batches,
                           data_fingerprint=meta.fingerprint, group_of=model_lib.parameter_group_of,
                           best_metric="micro_f1",
                           matmuls_emulated=emulated)

    def validate() -> tuple[dict, dict]:
        return evaluate(model, splits["validation"], cfg, pc, meta, device)

    dtypes = None
    while run.next_step():
        for micro in range(run.local_accumulation):  # this rank's share of the step's micro-batches
            batch = next(batches).to(device)
            run.seed_micro_batch(micro)
            last = micro == run.local_accumulation - 1  # DDP all-reduces the gradients on the last one
            # eager when measured; matmuls emulated in fp32 where this CPU has no native fp16/bf16 ones
            with run.forward_backward(), distributed.gradient_sync(forward, sync=last), cpu.matmul_emulation(emulated):
                with precision.autocast(pc, device):
                    logits = forward(batch.input_ids, batch.attention_mask)
                loss = model_lib.bce_loss(logits, batch.targets, pc.loss_dtype) / run.local_accumulation  # DDP avg
                scaler.scale(loss).backward()
            # FLOPs at the padded width: what is computed
            run.micro_batch(loss, logits, samples=len(batch), flops=flops_of(batch.input_ids.shape[1]) * len(batch))
        scaler.unscale_(optimizer)  # no-op unless loss scaling is on; clipping sees true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        with run.optimizer_step():
            scaler.step(optimizer)  # skips the update if the scaled gradients overflowed
        scaler.update()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()  # advances on skipped steps too, identically for every config
        dtypes = dtypes or precision.check_dtypes(pc, model.encoder, model.head, logits, optimizer, loss=loss,
                                                  scaler=scaler)
        optimizer.zero_grad(set_to_none=True)
        run.end_step(grad_norm, lr, validate)
    out = run.finish()
    if not world.is_main:  # rank 0 evaluates and reports
        return out
    out.update(results.row_fields(
        samples_seen=out["micro_batches"] * cfg.batch_size, padding_fraction=batches.padding_fraction,
        compiled=compiled, optimizer_step_compiled=optimizers.compiles_optimizer_step(pc, device),
        matmuls_emulated=emulated,
        dtypes=dtypes, eval_dtypes=run.eval_dtypes, eval_precision=cfg.eval_precision,
        data=meta.raw["source"],  # what was trained on (kind synthetic-ids: the full shape on random ids)
        model_source=model_lib.encoder_source(cfg.model_name, model.encoder), init_weights_sha256=init_sha256))
    if out["status"] == "diverged":
        return {**out, **run.memory_fields()}
    best = run.load_best()
    with run.evaluating():
        test, _ = evaluate(model, splits["test"], cfg, pc, meta, device)
    out.update(results.row_fields(best_val_step=best["step"], **{f"val_{k}": v for k, v in best["metrics"].items()},
                                  **test, **run.memory_fields()))
    return out

def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring); returns the process exit code."""
    try:
        args, cfg = runner.parse_args(__doc__, TrainConfig, PRESETS, argv)
        runs = sweep.grid(args.config_names, args.seed, args.seeds)
        if args.list_runs:
            print(sweep.list_runs(runs))
            return 0
        if not args.plan:  # a file or a user's folder at --output_dir: refused before any work (a plan writes none)
            claim_folder(cfg.output_dir, results.SETUP_FILE, "fingerprint")
        world, device = runner.join_world(cfg, runs)
        threads, busy_warning = runner.pick_threads(cfg.threads, device)
        with distributed.main_process_first(world):  # rank 0 prepares a missing cache alone
            meta = load_cache(cfg)
        if busy_warning and world.is_main:  # after the data: a command without prepared data ends on its one error
            print(busy_warning)
        setup_fp, setup = runner.setup_of(cfg.to_record(), meta.fingerprint, device)
        grid = sweep.Grid(runs, cfg.output_dir, setup_fp, EXPERIMENT, retry_failed=args.retry_failed, fresh=args.fresh,
                          skip_reasons=runner.skip_reasons(args.config_names, device, cfg))
        if args.plan:
            return plan.print_plan(args.config_names, args.seeds, grid.pending(), cfg, device,
                                   lambda short, pc, rid: train_one(short, pc, args.seed, meta, device, rid))
        results.claim_output_dir(cfg.output_dir, setup_fp, setup)
    except runner.BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    script = str(Path(__file__).resolve())
    if args.launcher != "local":  # one job per run; each picks the threads of the node it lands on
        return sweep.launch_sweep(args, script, grid, runner.child_flags(argv, None), results.REPORTED_METRICS)
    if len(runs) > 1:  # one process per run, all timed with the threads decided here; skips recorded here
        swept = dataclasses.replace(cfg, threads=cfg.threads or threads)  # each run's config
        metrics = results.REPORTED_METRICS
        code = sweep.run_sweep(script, grid, runner.child_flags(argv, None if cfg.threads else threads), metrics,
                               preload=PRELOAD, record_skip=functools.partial(
                                   runner.record_skip, EXPERIMENT, setup_fp, swept, device, world, metrics))
        if cfg.forecast is None:
            return code
        from analysis.forecast import print_forecast  # the forecast's table, from the rows just written

        return print_forecast(cfg.output_dir, code)
    pc, seed = precision.get(args.config_names[0]), args.seed
    rid, reason = grid.run_id(runs[0]), grid.skip_reasons[pc.name]
    try:
        with sweep.run_gate(cfg.output_dir, setup_fp, rid, retry_failed=args.retry_failed, fresh=args.fresh,
                            world=world, skip_reason=reason) as done:
            if done is not None:  # done already, or another process holds its lock
                return done
            runner.prepare_run_dir(cfg.output_dir, rid, world, fresh=args.fresh)
            with runner.RecordedRun(runner.first_fields(EXPERIMENT, pc, seed, setup_fp, cfg, device), cfg.output_dir,
                                    world, results.REPORTED_METRICS) as recorded:
                if reason:
                    recorded.skip(reason)
                else:
                    recorded.row.update(train_one(cfg, pc, seed, meta, device, rid))
            return recorded.exit_code
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
