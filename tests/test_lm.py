"""The language-modelling experiment: data path, loss, model precision, and the real run.py end to end."""
from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_run
from dtype_bench import optimizers, precision
from tiny_run import assert_mfu_is_per_device

ROOT = Path(__file__).resolve().parents[1]
LM_DIR = ROOT / "experiments" / "lm"
RUN = LM_DIR / "run.py"
# Seconds per run on 2 cores, yet every code path: accumulation, several log lines, two evaluations. One thread:
# runs compared value for value must sum in the same order, and on a busy machine each run would otherwise pick
# its own thread count from the cores free when it starts.
SMALL = ["--preset", "tiny", "--n_layer", "1", "--n_head", "1", "--n_embd", "64", "--block_size", "32",
         "--batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", "6", "--eval_steps", "3",
         "--eval_sequences", "16", "--log_every", "1", "--timing_warmup_steps", "1", "--diagnostics_every", "3",
         "--learning_rate", "3e-3", "--threads", "1"]


def import_lm(*names: str) -> list:
    """experiments/lm modules (the package experiments.lm)."""
    return [importlib.import_module(f"experiments.lm.{n}") for n in names]


data_lib, model_lib, prepare_data = import_lm("data", "model", "prepare_data")


def run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(RUN), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines()]


def step_log(output_dir: Path, row: dict) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "logs" / f"{row['run_id']}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> Path:
    """A small synthetic-corpus cache (60 documents, ~40k tokens) through the same code as the tiny preset's."""
    return prepare_data.prepare("synthetic", tmp_path_factory.mktemp("lm") / "cache", tokenizer="bpe:512",
                                val_fraction=0.1, synthetic_docs=60)


# ------------------------------------------------------------------------------------------------ data


def test_local_text_files_become_eos_separated_uint16_streams(tmp_path, capsys):
    texts = {f"doc{i}.txt": f"Article {i}. The Member States shall comply with this Regulation by {i} May.\n" * 3
             for i in range(12)}
    for name, text in texts.items():
        (tmp_path / "texts" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "texts" / name).write_text(text)
    out = prepare_data.prepare(str(tmp_path / "texts"), tmp_path / "cache", tokenizer="bpe:300", val_fraction=0.25)
    meta = data_lib.read_meta(out)
    assert meta.raw["documents"] == {"train": 9, "val": 3} and meta.vocab_size == 300
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    decoded = []
    for split in data_lib.SPLITS:
        tokens = data_lib.load_tokens(meta, split)
        assert tokens.dtype == np.uint16 and len(tokens) == meta.tokens[split] and tokens[-1] == meta.eos_token_id
        ids = tokens.tolist()
        while ids:  # every document is followed by one end-of-text token
            end = ids.index(meta.eos_token_id)
            decoded.append(tokenizer.decode(ids[:end]))
            ids = ids[end + 1 :]
    assert sorted(decoded) == sorted(texts.values())

    capsys.readouterr()
    assert prepare_data.prepare(str(tmp_path / "texts"), out, tokenizer="bpe:300", val_fraction=0.25) == out
    assert "reusing cache" in capsys.readouterr().out
    (tmp_path / "texts" / "doc0.txt").write_text("changed")
    prepare_data.prepare(str(tmp_path / "texts"), out, tokenizer="bpe:300", val_fraction=0.25)
    assert data_lib.read_meta(out).fingerprint != meta.fingerprint  # a changed file rebuilds the cache


def test_truncated_or_missing_cache_is_refused(synthetic_cache, tmp_path):
    with pytest.raises(data_lib.CacheError, match="meta.json missing"):
        data_lib.read_meta(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (broken / name).write_bytes((synthetic_cache / name).read_bytes())
    with open(broken / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(data_lib.CacheError, match="val.bin missing or not"):
        data_lib.read_meta(broken)


def test_train_batches_are_next_token_windows_fixed_by_seed_and_position(synthetic_cache):
    meta = data_lib.read_meta(synthetic_cache)
    tokens = data_lib.load_tokens(meta, "train")
    first = data_lib.TrainBatches(tokens, 16, 4, seed=0)
    batches = [next(first) for _ in range(3)]
    for batch in batches:
        assert batch.input_ids.shape == batch.targets.shape == (4, 16) and batch.input_ids.dtype == torch.int64
        assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])
        stream_windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens), 17)
        for row, target in zip(batch.input_ids, batch.targets):  # each row + its last target: a real window
            window = np.concatenate([row.numpy(), target.numpy()[-1:]])
            assert (stream_windows == window).all(axis=1).any()
    again = data_lib.TrainBatches(tokens, 16, 4, seed=0)
    again.seek({"index": 2})  # resuming at a position continues the same stream
    assert torch.equal(next(again).input_ids, batches[2].input_ids)
    assert not torch.equal(next(data_lib.TrainBatches(tokens, 16, 4, seed=1)).input_ids, batches[0].input_ids)


def test_validation_windows_are_fixed_and_non_overlapping(synthetic_cache):
    tokens = data_lib.load_tokens(data_lib.read_meta(synthetic_cache), "val")
    batches = list(data_lib.eval_batches(tokens, 32, 5, max_sequences=12))
    assert [len(b) for b in batches] == [5, 5, 2]
    inputs = torch.cat([b.input_ids for b in batches])
    assert torch.equal(inputs.flatten(), torch.from_numpy(tokens[: 12 * 32].astype(np.int64)))
    everything = sum(len(b) for b in data_lib.eval_batches(tokens, 32, 5, max_sequences=None))
    assert everything == (len(tokens) - 1) // 32


# ------------------------------------------------------------------------------------------- loss, model


def test_loss_is_the_hand_computed_cross_entropy_in_fp32():
    logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.bfloat16)  # exact in bf16
    targets = torch.tensor([[0, 2]])
    # -log softmax: log(1 + e^-1 + e^-2) for the first position, log(3) for the uniform second one
    expected = (math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(3)) / 2
    loss = model_lib.cross_entropy(logits, targets, torch.float32)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected, rel=1e-6)
    # fp16 logits near fp16's max: the loss must come from fp32 math, where nothing overflows
    big = torch.tensor([[[60000.0, 0.0]]], dtype=torch.float16)
    assert model_lib.cross_entropy(big, torch.tensor([[1]]), torch.float32).item() == 60000.0


def test_vocabulary_is_padded_like_nanogpt():
    assert model_lib.padded_vocab_size(50257) == 50304 and model_lib.padded_vocab_size(4096) == 4096


# One config per combination of body weights, head weights, logits and optimizer state that the tied LM
# head meets (the registry's own semantics are tested in test_precision.py). bf16_sr_fp32_moments' optimizer
# (stochastic rounding, fp32 moments) is bf16_body_fp32_head's without the fp32 head.
@pytest.mark.parametrize("name", ["fp32_baseline", "amp_fp16", "fp16_naive", "bf16_naive", "amp_bf16_8bit_adam",
                                  "amp_bf16_fp32_head", "bf16_body_fp32_head"])
def test_configs_get_the_dtypes_they_name_with_the_tied_head(name):
    pc = precision.REGISTRY[name]
    torch.manual_seed(0)
    gpt2 = model_lib.build_gpt2(300, n_layer=1, n_head=1, n_embd=64, block_size=16, dropout=0.0, eos_token_id=2)
    precision.apply_matmul_precision(pc)  # as run.py does: check_dtypes checks the TF32 flags too
    model = model_lib.CausalLM(gpt2, precision.head_autocast(pc, torch.device("cpu")))
    precision.cast_model(model.body(), model.head, pc)
    assert model.head.weight is gpt2.transformer.wte.weight  # still tied after casting
    assert {id(p) for p in model.parameters()} == {id(p) for p in (*model.body().parameters(), model.head.weight)}
    optimizer = optimizers.build_optimizer(pc, model_lib.param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95),
                                          eps=1e-8, weight_decay=0.1, device=torch.device("cpu"))
    scaler = precision.grad_scaler(pc, torch.device("cpu"))
    inputs = torch.randint(0, 300, (2, 16))
    with precision.autocast(pc, torch.device("cpu")):
        logits = model(inputs)
    scaler.scale(model_lib.cross_entropy(logits, inputs, pc.loss_dtype)).backward()
    scaler.step(optimizer)
    got = precision.check_dtypes(pc, model.body(), model.head, logits, optimizer)  # raises on any mismatch
    assert logits.shape == (2, 16, 320)  # 300 tokens padded to a multiple of 64
    assert got["head_params"] == [precision.dtype_name(pc.head_dtype)]


def test_weight_decay_applies_to_matrices_only():
    gpt2 = model_lib.build_gpt2(300, n_layer=1, n_head=1, n_embd=64, block_size=16, dropout=0.0, eos_token_id=2)
    decay, no_decay = model_lib.param_groups(gpt2, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model_lib.count_parameters(gpt2)


# ------------------------------------------------------------------------------------------ end to end


def test_tiny_preset_prepares_its_data_offline_and_writes_a_complete_row(tmp_path):
    """No --data_dir: the tiny preset builds its synthetic corpus and BPE under ./data/lm/tiny first."""
    proc = run([*SMALL, "--config", "amp_bf16", "--seed", "0", "--output_dir", "out"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = data_lib.read_meta(tmp_path / "data" / "lm" / "tiny")
    assert meta.raw["source"]["kind"] == "synthetic" and meta.raw["tokenizer"]["name"].startswith("bpe:")
    out = tmp_path / "out"
    (row,) = rows(out)
    assert (row["experiment"], row["config"], row["seed"], row["status"]) == ("lm", "amp_bf16", 0, "completed")
    assert row["steps"] == 6 and row["micro_batches"] == 12 and row["tokens_seen"] == 12 * 4 * 32
    for key in ("tokens_per_second", "samples_per_second", "peak_memory_gb", "val_loss", "perplexity"):
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, key
    assert row["tokens_per_second"] == pytest.approx(row["samples_per_second"] * 32)
    assert row["perplexity"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-5)
    assert row["dtypes"]["logits"] == "bfloat16" and row["dtypes"]["body_params"] == ["float32"]
    assert row["precision"]["name"] == "amp_bf16" and row["env"]["torch"] and row["train_config"]["block_size"] == 32
    log = step_log(out, row)
    train = [r for r in log if "eval" not in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["max_abs_logit"] > 0 for r in train)
    vocab = model_lib.padded_vocab_size(meta.vocab_size)
    assert train[0]["loss"] == pytest.approx(math.log(vocab), abs=0.3)  # near-uniform predictions at init
    evals = [r for r in log if r.get("eval") == "validation"]
    assert [r["step"] for r in evals] == [3, 6] and evals[-1]["loss"] == row["val_loss"]
    assert evals[-1]["loss"] < evals[0]["loss"] < train[0]["loss"]  # it learns


@pytest.mark.slow
def test_sweep_runs_every_config_on_identical_batches_and_prints_the_table(synthetic_cache, tmp_path):
    out = tmp_path / "sweep"
    proc = run([*SMALL, "--config", "fp32_baseline,amp_bf16_fp32_head,fp32_tf32_matmul", "--seeds", "1",
                "--data_dir", str(synthetic_cache), "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {r["config"]: r for r in rows(out)}
    assert {c: r["status"] for c, r in got.items()} == {
        "fp32_baseline": "completed", "amp_bf16_fp32_head": "completed", "fp32_tf32_matmul": "skipped"}
    assert "TF32" in got["fp32_tf32_matmul"]["reason"]
    assert got["amp_bf16_fp32_head"]["dtypes"]["logits"] == "float32"  # the LM head ran outside autocast
    table = proc.stdout[proc.stdout.index("config"):]
    assert "val_loss" in table and "tokens_per_second" in table and "(n=1)" in table  # one seed: no spread
    first = {c: step_log(out, r)[0]["loss"] for c, r in got.items() if r["status"] == "completed"}
    assert first["fp32_baseline"] == pytest.approx(first["amp_bf16_fp32_head"], rel=0.02)


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(synthetic_cache, tmp_path):
    """SIGTERM checkpoints at the next step boundary; running the command again resumes there (the shared
    run_state.RunState) and ends with the same step log, validation curve and diagnostics as one run."""
    flags = [*SMALL, "--config", "amp_bf16", "--max_steps", "40", "--eval_steps", "10",
             "--data_dir", str(synthetic_cache)]
    reference = run([*flags, "--output_dir", str(tmp_path / "reference")])
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "interrupted"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, str(RUN), *flags, "--output_dir", str(out)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = out / "logs"
    while process.poll() is None and not any(
            json.loads(line)["step"] >= 3 for f in (logs.glob("*.jsonl") if logs.exists() else [])
            for line in f.read_text().splitlines() if line.endswith("}")):
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]  # stopped before the end, no row

    resumed = run([*flags, "--output_dir", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (row,), (expected,) = rows(out), rows(tmp_path / "reference")
    assert row["resumed_from_steps"] and 3 <= row["resumed_from_steps"][0] < 40
    assert f"resuming {row['run_id']} from step {row['resumed_from_steps'][0]}" in resumed.stdout
    reference = step_log(tmp_path / "reference", expected)
    assert tiny_run.without_timing(step_log(out, row)) == tiny_run.without_timing(reference)
    for key in ("val_loss", "perplexity", "val_loss_curve", "steps", "micro_batches", "tokens_seen",
                "mean_update_fidelity", "diagnostics_measured_steps", "nonfinite_origin"):
        assert row[key] == expected[key], key


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(synthetic_cache, tmp_path):
    """torchrun with 2 ranks, each computing one of the step's 2 micro-batches: the same stream, the same
    effective batch and, up to reduction order, the same losses as one process."""
    flags = [*SMALL, "--config", "fp32_baseline", "--data_dir", str(synthetic_cache)]
    single = run([*flags, "--output_dir", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr[-3000:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(RUN), *flags, "--output_dir", str(tmp_path / "ddp")],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    (one,), (two,) = rows(tmp_path / "single"), rows(tmp_path / "ddp")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["tokens_seen"] == one["tokens_seen"] == 6 * 2 * 4 * 32  # same effective batch
    log_one, log_two = step_log(tmp_path / "single", one), step_log(tmp_path / "ddp", two)
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one]  # rank 0 alone writes, once per step
    for a, b in zip(log_one, log_two):  # 1e-4: room for another summation order (NCCL, more ranks)
        for key in ("loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert_mfu_is_per_device(one, two)


@pytest.mark.parametrize("args, needle", [
    (["--config", "amp_bf17"], "valid: all, core, fp32_baseline"),
    pytest.param(["--config", "amp_bf16", "--n_embd", "100", "--n_head", "3"], "multiple of --n_head",
                 marks=pytest.mark.slow),
    pytest.param(["--config", "amp_bf16", "--seeds", "0"], "--seeds must be 1..1000", marks=pytest.mark.slow),
])
def test_bad_arguments_fail_with_one_line_and_write_nothing(args, needle, tmp_path):
    proc = run([*args, "--output_dir", str(tmp_path / "out")])
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_seed_command_without_prepared_data_says_what_to_run(tmp_path):
    proc = run(["--config", "amp_bf16", "--seed", "0"], cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "prepare_data.py" in line and "openwebtext" in line and "--preset tiny" in line
    assert not (tmp_path / "results").exists()


def test_prepare_never_replaces_a_folder_that_is_not_ours(tmp_path):
    """The LM cache: a user's folder, or the source folder itself, is refused before any work."""
    from dtype_bench.io import FolderRefused

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "doc.txt").write_text("A document.\n")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("thesis")
    for out in (precious, texts):
        with pytest.raises(FolderRefused, match="holds no meta.json of ours"):
            prepare_data.prepare(str(texts), out, tokenizer="bpe:300", val_fraction=0.25)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "precious", "precious/thesis.txt", "texts", "texts/doc.txt"]


def test_synthetic_ids_cache_is_built_with_numpy_alone(tmp_path):
    """With `datasets` unimportable: documents of random word ids, each followed by eos, split by document; the
    ids are what the words:SIZE tokenizer saved with the cache gives for the same documents written as words."""
    script = f"""
import sys
class NoDatasets:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "datasets":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoDatasets())
from experiments.lm.prepare_data import prepare
prepare("synthetic-ids", {str(tmp_path / "ids")!r}, tokenizer="words:1000", val_fraction=0.1, synthetic_docs=40)
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[1],
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    from transformers import AutoTokenizer

    from dtype_bench.synthetic import ID_WORD

    meta = json.loads((tmp_path / "ids" / "meta.json").read_text())
    assert meta["documents"] == {"train": 36, "val": 4}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ids" / "tokenizer")
    for split in ("train", "val"):
        stream = np.fromfile(tmp_path / "ids" / f"{split}.bin", dtype=np.uint16)
        assert len(stream) == meta["tokens"][split]
        documents = np.split(stream, np.flatnonzero(stream == tokenizer.eos_token_id) + 1)[:-1]
        assert len(documents) == meta["documents"][split]
        for doc in documents[:3]:
            ids = doc[:-1].tolist()
            assert min(ids) >= 5 and max(ids) < 1000
            words = " ".join(map(ID_WORD.format, ids))
            assert tokenizer(words, add_special_tokens=False)["input_ids"] == ids
