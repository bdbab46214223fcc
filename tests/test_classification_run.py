"""The real experiments/classification/run.py on the tiny preset (CPU, seconds per run): a few cases as a user runs
the script, the rest through its main(argv) in this process."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_run

ROOT = tiny_run.ROOT
RUN = tiny_run.RUN
# Small enough for seconds per run on 2 cores, large enough to exercise every code path.
SMALL = ["--preset", "tiny", "--tiny_layers", "1", "--tiny_hidden", "64", "--max_length", "64",
         "--batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", "4", "--eval_steps", "2",
         "--log_every", "1", "--max_eval_docs", "32", "--timing_warmup_steps", "1", *tiny_run.PINNED]
REPORTED_METRICS = ("samples_per_second", "peak_memory_gb", "micro_f1", "macro_f1",
                "precision_at_1", "precision_at_3", "precision_at_5")


def run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The real script in its own interpreter (what a user types)."""
    return subprocess.run([sys.executable, str(RUN), *args], cwd=cwd, env=tiny_run.ENV, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def run_main():
    """run.py's main, called in this process (no interpreter start-up per case)."""
    from experiments.classification.run import main

    return main


def rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines()]


def test_single_run_writes_a_complete_row_and_step_log(small_cache_dir, tmp_path):
    out = tmp_path / "out"
    proc = run([*SMALL, "--config", "amp_bf16", "--seed", "0", "--data_dir", str(small_cache_dir),
                "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = rows(out)
    assert row["status"] == "completed" and row["config"] == "amp_bf16" and row["seed"] == 0
    for key in REPORTED_METRICS:
        assert isinstance(row[key], float) and math.isfinite(row[key]), key
    assert 0 <= row["micro_f1"] <= 1 and row["steps"] == 4 and row["micro_batches"] == 8
    assert row["dtypes"]["logits"] == "bfloat16" and row["dtypes"]["body_params"] == ["float32"]
    assert row["precision"]["autocast_dtype"] == "bfloat16"
    assert row["env"]["torch"] and row["peak_memory_kind"].startswith("cpu_peak_rss")
    log = [json.loads(line) for line in (out / "logs" / f"{row['run_id']}.jsonl").read_text().splitlines()]
    train_lines = [r for r in log if "eval" not in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train_lines)
    assert [r["step"] for r in log if r.get("eval") == "validation"] == [2, 4]
    assert row["val_micro_f1"] == max(r["micro_f1"] for r in log if r.get("eval") == "validation")


def test_sweep_runs_each_seed_in_its_own_process_and_prints_the_table(run_main, small_cache_dir, tmp_path, capsys):
    """A sweep (its parent here in this process) runs each seed as its own run.py and tabulates them; seeds draw
    different batches."""
    out = tmp_path / "sweep"
    code = run_main([*SMALL, "--config", "fp32_baseline", "--seeds", "2", "--data_dir", str(small_cache_dir),
                     "--output_dir", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:]
    assert sorted((r["config"], r["seed"], r["status"]) for r in rows(out)) == [
        ("fp32_baseline", 0, "completed"), ("fp32_baseline", 1, "completed")]
    table = stdout[stdout.index("config"):]
    assert "fp32_baseline" in table and "±" in table and "micro_f1" in table
    first = {r["seed"]: json.loads((out / "logs" / f"{r['run_id']}.jsonl").read_text().splitlines()[0])
             for r in rows(out)}
    assert first[0]["loss"] != first[1]["loss"]


def test_configs_of_one_seed_train_on_identical_batches(run_main, small_cache_dir, tmp_path):
    """Same seed, other precision: the same batches, so the first step's loss agrees up to bf16 rounding."""
    first = {}
    for config in ("fp32_baseline", "amp_bf16"):
        out = tmp_path / config
        assert run_main([*SMALL, "--config", config, "--seed", "0", "--max_steps", "1", "--eval_steps", "1",
                         "--data_dir", str(small_cache_dir), "--output_dir", str(out)]) == 0
        (row,) = rows(out)
        first[config] = json.loads((out / "logs" / f"{row['run_id']}.jsonl").read_text().splitlines()[0])
    assert first["fp32_baseline"]["loss"] == pytest.approx(first["amp_bf16"]["loss"], rel=0.02)
    assert first["fp32_baseline"]["loss"] != first["amp_bf16"]["loss"]  # two precisions really ran


def test_fp32_evaluation_runs_an_upcast_copy_and_is_checked(run_main, small_cache_dir, tmp_path):
    out = tmp_path / "fp32_eval"
    assert run_main([*SMALL, "--config", "bf16_naive", "--eval_precision", "fp32", "--data_dir", str(small_cache_dir),
                     "--output_dir", str(out)]) == 0
    (row,) = rows(out)
    assert row["status"] == "completed" and row["eval_precision"] == "fp32"
    assert row["dtypes"]["body_params"] == ["bfloat16"] and row["dtypes"]["logits"] == "bfloat16"
    assert row["eval_dtypes"]["body_params"] == row["eval_dtypes"]["head_params"] == ["float32"]
    assert row["eval_dtypes"]["logits"] == "float32" and math.isfinite(row["loss"])


def test_hardware_the_config_needs_is_recorded_as_skipped(run_main, small_cache_dir, tmp_path):
    out = tmp_path / "skip"
    assert run_main([*SMALL, "--config", "fp32_tf32_matmul", "--data_dir", str(small_cache_dir), "--output_dir",
                     str(out)]) == 0
    (row,) = rows(out)
    assert row["status"] == "skipped" and "TF32" in row["reason"]


def test_a_bad_argument_through_the_script_is_one_line_exit_2_and_writes_nothing(tmp_path):
    """The script as a user runs it: the same contract the in-process cases below check through main(argv),
    here with the interpreter's own stderr (no traceback, no warning lines)."""
    proc = run(["--config", "amp_bf17", "--output_dir", str(tmp_path / "out")])
    assert proc.returncode == 2
    assert "valid: all, core, fp32_baseline" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_seed_command_without_prepared_data_says_what_to_run(tmp_path):
    """The plan's command verbatim, as a user runs it from a folder without data (the other seed commands are
    checked in-process below)."""
    proc = run(["--config", "amp_bf16", "--seed", "0"], cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "prepare_data.py" in line and "--preset tiny" in line
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("seed_command", [
    ["--config", "all", "--seeds", "3"],
    ["--config", "amp_bf16", "--max_steps", "100"],
])
def test_seed_commands_without_prepared_data_say_what_to_run(seed_command, run_main, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main(seed_command) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "prepare_data.py" in line and "--preset tiny" in line
    assert not (tmp_path / "results").exists()


def test_output_dir_of_another_setup_is_refused(run_main, small_cache_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main([*SMALL, "--config", "fp32_tf32_matmul", "--data_dir", str(small_cache_dir),
                     "--output_dir", str(out)]) == 0
    before = (out / "results.jsonl").read_text()
    capsys.readouterr()
    code = run_main([*SMALL, "--config", "amp_bf16", "--max_steps", "3", "--data_dir", str(small_cache_dir),
                     "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "different setup" in err and "max_steps" in err
    assert (out / "results.jsonl").read_text() == before


@pytest.mark.parametrize("case, flags, needle", [
    ("unknown_config", ["--config", "amp_bf17"], "valid: all, core, fp32_baseline"),
    ("seeds", ["--seeds", "0"], "--seeds must be 1..1000"),
    ("batch_size", ["--batch_size", "0"], "--batch_size must be positive"),
    ("max_steps", ["--max_steps", "-1"], "--max_steps must be positive"),
    ("nan", ["--learning_rate", "nan"], "--learning_rate: Expected a <class 'float'>. Got value: nan"),
    ("yaml_inf", ["--learning_rate", ".inf"], "--learning_rate must be a finite number"),
    ("beta", ["--adam_beta1", "2"], "--adam_beta1 must be in [0, 1)"),
    ("seed", ["--seed", "-1"], "the seeds within 0..2^32-1"),
    ("seed_beyond_numpy", ["--seed", "4294967296"], "the seeds within 0..2^32-1"),
    ("huge_grid", ["--seeds", "100000000", "--list_runs"], "--seeds must be 1..1000"),
    ("slurm_time", ["--slurm_time_min", "-5"], "--slurm_time_min must be positive"),
    ("symlink_loop", [], "Symlink loop"),
    ("long_name", [], "more than a file system allows"),
    ("threads", ["--threads", "-1"], "--threads must be positive"),
    ("device", ["--device", "tpu9"], "--device 'tpu9' is not a device"),
    ("user_folder", [], "holds no setup.json of ours"),
    ("file", [], "is a file, not a folder"),
    ("zero_label_cache", [], "has no labels"),
    ("garbled_cache_meta", [], "unreadable meta.json"),
    ("world_size_3", [], "not divisible by the world size 3"),
])
def test_bad_values_folders_and_caches_fail_with_one_line_and_write_nothing(
        case, flags, needle, run_main, small_cache_dir, tmp_path, monkeypatch, capsys):
    """Each is one line and exit 2 with nothing written (no `failed` row, no setup.json), so the corrected
    command can use the same folder."""
    out, cache = tmp_path / "out", small_cache_dir
    if case == "user_folder":
        out.mkdir()
        (out / "thesis.txt").write_text("thesis")
    elif case == "file":
        out.write_text("thesis")
    elif case == "symlink_loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        out = tmp_path / "a" / "out"
    elif case == "long_name":
        out = tmp_path / ("y" * 300)
    elif case in ("zero_label_cache", "garbled_cache_meta"):
        cache = tmp_path / "cache"
        shutil.copytree(small_cache_dir, cache)
        meta = json.loads((cache / "meta.json").read_text())
        (cache / "meta.json").write_text(json.dumps({**meta, "num_labels": 0}) if case == "zero_label_cache"
                                         else json.dumps(meta)[:40])
    elif case == "world_size_3":
        for name, value in (("WORLD_SIZE", "3"), ("RANK", "0"), ("LOCAL_RANK", "0")):  # as torchrun sets them
            monkeypatch.setenv(name, value)
    def snapshot() -> dict:  # everything under tmp_path (links not followed)
        return {p: p.read_bytes() if p.is_file() and not p.is_symlink() else None for p in tmp_path.rglob("*")}

    before = snapshot()
    code = run_main([*SMALL, "--config", "amp_bf16", "--data_dir", str(cache), "--output_dir", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert snapshot() == before


def test_corrupt_checkpoint_is_refused_in_one_line_with_the_remedy(run_main, small_cache_dir, tmp_path, capsys):
    """One line saying what to do, no traceback; the `failed` row records why (a sweep goes on, and
    `--retry_failed --fresh` starts the run over)."""
    import torch

    import tiny_run
    from dtype_bench import checkpoint, results, runner

    out = tmp_path / "out"
    argv = [*SMALL, "--config", "amp_bf16", "--data_dir", str(small_cache_dir), "--output_dir", str(out)]
    config_module = tiny_run.load_config_module("classification")
    _, cfg = runner.parse_args(None, config_module.TrainConfig, config_module.PRESETS, argv)
    data_fingerprint = json.loads((small_cache_dir / "meta.json").read_text())["fingerprint"]
    setup_fp, setup = runner.setup_of(cfg.to_record(), data_fingerprint, torch.device("cpu"))
    results.claim_output_dir(out, setup_fp, setup)  # as the run that wrote the checkpoint did
    last = checkpoint.run_dir(out, results.run_id("classification", "amp_bf16", 0, setup_fp)) / "last"
    last.mkdir(parents=True)
    (last / checkpoint.MANIFEST).write_text("{torn")
    code = run_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "unreadable" in err[0] and "--fresh" in err[0], err
    (row,) = rows(out)
    assert row["status"] == "failed" and row["error"].startswith("CheckpointError: checkpoint")


def test_stale_cache_is_refused(run_main, small_cache_dir, tmp_path, capsys):
    code = run_main([*SMALL, "--config", "amp_bf16", "--max_length", "4096", "--data_dir", str(small_cache_dir),
                     "--output_dir", str(tmp_path / "out")])
    assert code == 2 and "exceeds the cache" in capsys.readouterr().err


@pytest.mark.slow
def test_comment_edit_of_the_data_modules_keeps_caches_and_output_dirs(tmp_path):
    """The cache fingerprint covers what determines the data, not the source bytes of the code that
    prepares it: after a comment edit of prepare_data.py, tokenization.py and synthetic.py (in a copy of
    the tree), both experiments' caches are reused, a killed run resumes from its checkpoint, and the
    output directory takes another seed. The run is killed as if between the two renames of its checkpoint
    swap: the resume puts the previous `last` back and says so."""
    import signal
    import time

    tree = tmp_path / "tree"
    for part in ("dtype_bench", "experiments"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**tiny_run.ENV, "PYTHONPATH": str(tree)}

    def script(*args: str, wait: bool = True):
        command = [sys.executable, *args]
        if not wait:
            return subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        return subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=600)

    cls_cache, lm_cache, out = tmp_path / "cls_cache", tmp_path / "lm_cache", tmp_path / "out"
    prepare_cls = ("experiments/classification/prepare_data.py", "--source", "synthetic", "--synthetic_docs", "600",
                   "--synthetic_labels", "300", "--tokenizer", "bpe:1000", "--max_length", "64",
                   "--output_dir", str(cls_cache))
    prepare_lm = ("experiments/lm/prepare_data.py", "--source", "synthetic", "--synthetic_docs", "100",
                  "--tokenizer", "bpe:400", "--val_fraction", "0.1", "--output_dir", str(lm_cache))
    for command in (prepare_cls, prepare_lm):
        assert script(*command).returncode == 0
    train = ("experiments/classification/run.py", *tiny_run.SMALL, "--max_steps", "12", "--eval_steps", "4",
             "--log_every", "1", "--config", "fp32_baseline", "--data_dir", str(cls_cache), "--output_dir", str(out))
    process = script(*train, "--seed", "0", wait=False)
    while not list(out.glob("checkpoints/*/last/manifest.json")) and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=120)
    assert not (out / "results.jsonl").exists()

    for module in ("experiments/classification/prepare_data.py", "experiments/lm/prepare_data.py",
                   "dtype_bench/tokenization.py", "dtype_bench/synthetic.py"):
        with open(tree / module, "a") as f:
            f.write("# a comment edit\n")
    for command in (prepare_cls, prepare_lm):
        again = script(*command)
        assert again.returncode == 0 and "reusing cache" in again.stdout, again.stdout + again.stderr
    resumed = script(*train, "--seed", "0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "from step 4" in resumed.stdout
    extended = script(*train, "--seed", "1")
    assert extended.returncode == 0, extended.stderr[-3000:]
    (first, second) = rows(out)
    assert first["status"] == second["status"] == "completed" and first["resumed_from_steps"] == [4]
    assert first["setup_fingerprint"] == second["setup_fingerprint"] and second["seed"] == 1


def test_plan_says_what_would_run_and_how_long_from_a_calibration_and_writes_nothing(
        run_main, small_cache_dir, tmp_path, capsys):
    import re

    out = tmp_path / "never_written"
    code = run_main([*SMALL, "--config", "fp32_baseline,fp32_tf32_matmul,amp_bf16", "--seeds", "2", "--max_steps",
                     "40", "--eval_steps", "20", "--max_cpu_slowdown", "none", "--plan",
                     "--data_dir", str(small_cache_dir), "--output_dir", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:]
    assert not out.exists()  # calibration runs live in a temporary directory
    lines = stdout.splitlines()
    assert "2 seed(s), 40 steps each" in next(line for line in lines if line.startswith("plan:"))
    skipped = next(line for line in lines if line.startswith("  fp32_tf32_matmul:"))
    assert "skipped" in skipped and "CUDA" in skipped
    per_run = {}
    for name in ("fp32_baseline", "amp_bf16"):
        line = next(line for line in lines if line.startswith(f"  {name}: trains"))
        step, evaluation, fixed = map(float, re.search(
            r"\(([\d.e+-]+) s/step, ([\d.e+-]+) s/evaluation, ([\d.e+-]+) s outside the loop", line).groups())
        shown = re.search(r"~([\d.]+) (min|s) per run", line)
        per_run[name] = float(shown[1]) * (60 if shown[2] == "min" else 1)
        # 40 steps, an evaluation every 20 steps (2), and the fixed cost, from the printed (3-digit) parts
        assert per_run[name] == pytest.approx(40 * step + 2 * evaluation + fixed, rel=0.05, abs=1)
    total = re.search(r"estimated total: ~([\d.]+) (min|s) for 4 run\(s\)", stdout)
    assert total and float(total[1]) * (60 if total[2] == "min" else 1) == pytest.approx(
        2 * sum(per_run.values()), rel=0.05, abs=2)
