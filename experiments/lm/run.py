"""Train GPT-2 from scratch (OpenWebText, or the offline synthetic corpus) under one precision config.

    python experiments/lm/run.py --config amp_bf16 --seed 0          # one run
    python experiments/lm/run.py --config all --seeds 3              # sweep, one process per run
    python experiments/lm/run.py --config core --preset tiny         # offline, CPU-sized

Reads top to bottom: data -> model under the precision config -> train loop -> evaluate -> row; `main` at the
end: parse -> plan or claim the output folder -> data -> one run under its gate, or a sweep. The command line,
sweeps and the results schema (dtype_bench.results.ResultRow) are the classification experiment's, so the
analysis compares the two directly.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

from pathlib import Path

if not __package__:  # run as a file (python experiments/lm/run.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from experiments.lm import data as data_lib
from experiments.lm import model as model_lib
from experiments.lm.config import PRESETS, TrainConfig
from dtype_bench import cpu, distributed, flops, loop, optimizers, plan, precision, progress, results, runner, sweep
from dtype_bench.io import claim_folder
from dtype_bench.runner import UserError

PRELOAD = ["experiments.lm.run", "transformers.models.gpt2.modeling_gpt2"]
"""What a sweep's forkserver imports once for all its runs (transformers loads the model's module lazily)."""
EXPERIMENT = "lm"
METRICS = ("tokens_per_second", "samples_per_second", "peak_memory_gb", "val_loss", "perplexity")


def load_cache(cfg: TrainConfig) -> data_lib.CacheMeta:
    """The prepared token streams; the offline presets build their synthetic ones on first use (seconds)."""
    if cfg.preset != "full" and cfg.data_dir is None:
        from experiments.lm.prepare_data import prepare_preset

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
    checked on the first batch. `model` is the uncompiled module: evaluation batches (another batch size, a short
    last batch) would each compile a graph, and their speed is not what a run measures."""
    model.eval()
    emulated = cpu.emulates_matmuls(pc, device, cfg.max_cpu_slowdown, cfg.emulate_slow_matmuls)
    total, n, dtypes = torch.zeros((), device=device), 0, None
    windows = len(range(0, len(tokens) - cfg.block_size, cfg.block_size))
    windows = windows if cfg.eval_sequences is None else min(windows, cfg.eval_sequences)
    for batch in progress.track(data_lib.eval_batches(tokens, cfg.block_size, cfg.eval_batch_size, cfg.eval_sequences),
                                f"{pc.name} evaluation", total=-(-windows // cfg.eval_batch_size)):
        batch = batch.to(device)
        with precision.autocast(pc, device), cpu.matmul_emulation(emulated):
            logits = model(batch.input_ids)
        loss = model_lib.cross_entropy(logits, batch.targets, pc.loss_dtype)
        dtypes = dtypes or precision.check_dtypes(pc, model.body(), model.head, logits, loss=loss)
        total += loss * len(batch)
        n += len(batch)
    model.train()
    loss = total / n
    return {"loss": float(loss), "perplexity": float(torch.exp(loss))}, dtypes  # NaN/Inf stay as they are


def train_one(cfg: TrainConfig, pc: precision.PrecisionConfig, seed: int, meta: data_lib.CacheMeta,
              device: torch.device, rid: str) -> results.ResultRow:
    """One run: returns the result fields (status, validation loss, timing, memory, dtypes)."""
    precision.apply_matmul_precision(pc)
    runner.seed_everything(seed)
    gpt2 = model_lib.build_gpt2(meta.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                block_size=cfg.block_size, dropout=cfg.dropout, eos_token_id=meta.eos_token_id)
    model = model_lib.CausalLM(gpt2, precision.head_autocast(pc, device))
    precision.cast_model(model.body(), model.head, pc)  # the head is the tied embedding matrix
    model.to(device).train()
    emulated = cpu.emulates_matmuls(pc, device, cfg.max_cpu_slowdown, cfg.emulate_slow_matmuls)  # quality only
    compiled = precision.should_compile(pc, device) and not emulated  # the model; torchao's step follows the flag
    forward = torch.compile(model) if compiled else model
    world = distributed.current_world()  # torchrun: DDP, each rank computing its share of every step
    forward = distributed.wrap(forward, world, device)
    optimizer = optimizers.build_optimizer(
        pc, model_lib.param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay, device=device)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps,
                                                            min_lr_rate=cfg.min_lr_ratio)
    scaler = precision.grad_scaler(pc, device)
    params = [p for p in model.parameters() if p.requires_grad]

    tokens = data_lib.open_splits(meta)  # pinned: a rebuild of the cache meanwhile does not change them
    batches = data_lib.TrainBatches(tokens["train"], cfg.block_size, cfg.batch_size, seed,
                                    rank=world.rank, world_size=world.world_size)
    # FLOPs of one sequence: the LM head (tied embedding) runs at every position
    sample_flops = flops.flops_counter(gpt2.transformer, model.head, head_per_token=True)(cfg.block_size)
    run = loop.TrainingRun(model, optimizer, scheduler, scaler, cfg=cfg, pc=pc, seed=seed, run_id=rid,
                           experiment=EXPERIMENT, device=device, world=world, batches=batches,
                           data_fingerprint=meta.fingerprint, group_of=model_lib.parameter_group_of,
                           matmuls_emulated=emulated)

    def validate() -> tuple[dict, dict]:
        return evaluate(model, tokens["val"], cfg, pc, device)

    dtypes = None
    while run.next_step():
        for micro in range(run.local_accumulation):  # this rank's share of the step's micro-batches
            batch = next(batches).to(device)
            run.seed_micro_batch(micro)
            last = micro == run.local_accumulation - 1  # DDP all-reduces the gradients on the last one
            # eager when measured; matmuls emulated in fp32 where this CPU has no native fp16/bf16 ones
            with run.forward_backward(), distributed.gradient_sync(forward, sync=last), cpu.matmul_emulation(emulated):
                with precision.autocast(pc, device):
                    logits = forward(batch.input_ids)
                loss = model_lib.cross_entropy(logits, batch.targets, pc.loss_dtype) / run.local_accumulation
                scaler.scale(loss).backward()
            run.micro_batch(loss, logits, samples=len(batch), flops=len(batch) * sample_flops)
        scaler.unscale_(optimizer)  # no-op unless loss scaling is on; clipping sees true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        with run.optimizer_step():
            scaler.step(optimizer)  # skips the update if the scaled gradients overflowed
        scaler.update()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()  # advances on skipped steps too, identically for every config
        dtypes = dtypes or precision.check_dtypes(pc, model.body(), model.head, logits, optimizer, loss=loss,
                                                  scaler=scaler)
        optimizer.zero_grad(set_to_none=True)
        run.end_step(grad_norm, lr, validate)
    out = run.finish()
    if not world.is_main:  # rank 0 evaluates and reports
        return out
    samples_per_second = out["samples_per_second"]
    out.update(results.row_fields(
        samples_seen=out["micro_batches"] * cfg.batch_size,
        tokens_seen=out["micro_batches"] * cfg.batch_size * cfg.block_size,
        n_params=model_lib.count_parameters(model), compiled=compiled,
        optimizer_step_compiled=optimizers.compiles_optimizer_step(pc, device), matmuls_emulated=emulated,
        dtypes=dtypes,
        eval_dtypes=run.eval_dtypes,
        data=meta.raw["source"],  # what was trained on (kind synthetic-ids: the full shape on random ids)
        # every training sequence is exactly block_size tokens long
        tokens_per_second=None if samples_per_second is None else samples_per_second * cfg.block_size,
        **run.memory_fields()))
    if out["status"] == "completed":  # the LM reports its last evaluation and keeps no best weights
        evals = run.state.evals
        out.update(results.row_fields(val_loss=evals[-1]["loss"], perplexity=evals[-1]["perplexity"],
                                      val_loss_curve=[[e["step"], e["loss"]] for e in evals]))
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
        return sweep.launch_sweep(args, script, grid, runner.child_flags(argv, None), METRICS)
    if len(runs) > 1:  # one process per run, all timed with the threads decided here; skips recorded here
        swept = dataclasses.replace(cfg, threads=cfg.threads or threads)  # each run's config
        code = sweep.run_sweep(script, grid, runner.child_flags(argv, None if cfg.threads else threads), METRICS,
                               preload=PRELOAD, record_skip=functools.partial(
                                   runner.record_skip, EXPERIMENT, setup_fp, swept, device, world, METRICS))
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
                                    world, METRICS) as recorded:
                if reason:
                    recorded.skip(reason)
                else:
                    recorded.row.update(train_one(cfg, pc, seed, meta, device, rid))
            return recorded.exit_code
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
