"""Sweeps: which runs run again, failure isolation, torn results lines, run locks and concurrent sweeps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_run

from dtype_bench import cpu, results, sweep
from dtype_bench.distributed import SINGLE_PROCESS
from dtype_bench.io import FolderRefused


def test_needs_run_rules():
    completed, diverged, failed, skipped = ({"status": s} for s in ("completed", "diverged", "failed", "skipped"))
    rules = dict(fresh=False, skip_reason=None)
    assert sweep.needs_run(None, retry_failed=False, **rules)  # never ran, or interrupted: run / resume
    assert not sweep.needs_run(completed, retry_failed=True, **rules)
    assert not sweep.needs_run(diverged, retry_failed=True, **rules)  # a divergence is a result
    assert not sweep.needs_run(failed, retry_failed=False, **rules)
    assert sweep.needs_run(failed, retry_failed=True, **rules)
    assert sweep.needs_run(completed, retry_failed=False, fresh=True, skip_reason=None)
    # a skip is re-evaluated: done while its reason applies, run once it no longer does (--max_cpu_slowdown none)
    assert not sweep.needs_run(skipped, retry_failed=True, fresh=False, skip_reason="bfloat16 matmuls 70x slower")
    assert sweep.needs_run(skipped, retry_failed=False, **rules)


def test_list_runs_prints_one_command_line_per_run():
    runs = sweep.grid(["fp32_baseline", "amp_bf16"], 3, 2)
    assert sweep.list_runs(runs).splitlines() == [
        "--config fp32_baseline --seed 3", "--config amp_bf16 --seed 3",
        "--config fp32_baseline --seed 4", "--config amp_bf16 --seed 4"]


def test_seed_table_keeps_nan_and_shows_no_spread_for_one_seed():
    """A completed run whose metric is NaN makes its config's mean NaN (not a crash, not filtered out); one seed has
    a mean and no standard deviation; the diverged run is explained under the table."""
    rows = [{"config": "a", "seed": 0, "status": "completed", "micro_f1": 0.5},
            {"config": "a", "seed": 1, "status": "completed", "micro_f1": float("nan")},
            {"config": "b", "seed": 0, "status": "completed", "micro_f1": 0.25},
            {"config": "b", "seed": 1, "status": "diverged", "diverged_at_step": 7, "nonfinite_origin": "loss",
             "nonfinite_origin_step": 6}]
    table = sweep.seed_summary_table(rows, ("micro_f1",)).splitlines()
    assert table[2].split()[-3:] == ["nan", "±", "nan"] and table[3].split()[-2:] == ["0.25", "(n=1)"]
    assert table[-1] == "b seed 1: diverged — non-finite loss from step 7, first non-finite value in loss at step 6"


def test_newest_row_of_a_run_counts():
    rows = [{"run_id": "a", "status": "failed"}, {"run_id": "b", "status": "completed"},
            {"run_id": "a", "status": "completed"}]
    assert {k: r["status"] for k, r in results.latest_per_run(rows).items()} == {"a": "completed", "b": "completed"}


def test_truncated_results_line_is_reported_and_the_next_row_survives(tmp_path, capsys):
    row = {"experiment": "e", "run_id": "r1", "config": "fp32_baseline", "seed": 0, "status": "completed",
           "setup_fingerprint": "s"}
    results.append_result(tmp_path, row)
    with open(tmp_path / "results.jsonl", "a") as f:  # a writer killed in the middle of its line
        f.write('{"experiment": "e", "run_id": "r2", "sta')
    results.append_result(tmp_path, {**row, "run_id": "r3"})
    rows, problems = results.read_results(tmp_path)
    assert [r["run_id"] for r in rows] == ["r1", "r3"]
    assert len(problems) == 1 and "results.jsonl:2: malformed line" in problems[0]
    assert [r["run_id"] for r in sweep.setup_rows(tmp_path, "s")] == ["r1", "r3"]
    assert "results.jsonl:2: malformed line" in capsys.readouterr().err


def test_run_lock_is_exclusive_across_processes_and_freed_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dtype_bench.sweep import claim_run\n"
         f"with claim_run({str(tmp_path)!r}, 'run-a') as claimed:\n"
         "    print(claimed, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert sweep.is_claimed(tmp_path, "run-a")
        assert not sweep.is_claimed(tmp_path, "run-b")
        with sweep.run_gate(tmp_path, "s", "run-a", retry_failed=False, fresh=False, world=SINGLE_PROCESS,
                            skip_reason=None) as code:
            assert code == sweep.EXIT_BUSY
    finally:
        holder.kill()
        holder.wait()
    assert not sweep.is_claimed(tmp_path, "run-a")  # SIGKILL released it


def test_run_gate_skips_a_done_run_and_reruns_it_when_fresh(tmp_path, capsys):
    row = {"experiment": "e", "run_id": "run-a", "config": "c", "seed": 0, "status": "completed",
           "setup_fingerprint": "s"}
    results.append_result(tmp_path, row)
    gate = dict(retry_failed=True, fresh=False, world=SINGLE_PROCESS, skip_reason=None)
    with sweep.run_gate(tmp_path, "s", "run-a", **gate) as code:
        assert code == 0 and "already completed" in capsys.readouterr().out
    with sweep.run_gate(tmp_path, "other-setup", "run-a", **gate) as code:
        assert code is None  # rows of another setup do not count
    with sweep.run_gate(tmp_path, "s", "run-a", **{**gate, "fresh": True}) as code:
        assert code is None
    results.append_result(tmp_path, {**row, "status": "failed", "error": "OutOfMemoryError: ..."})
    with sweep.run_gate(tmp_path, "s", "run-a", **{**gate, "retry_failed": False}) as code:
        assert code == 1 and "--retry_failed" in capsys.readouterr().out


# ---------------------------------------------------------------- real sweeps of run.py


FAST = ["--max_steps", "6", "--eval_steps", "3", "--diverge_patience", "2", "--diagnostics_every", "0"]


@pytest.mark.slow
def test_sweep_survives_a_failing_and_a_diverging_run(tmp_path, small_cache_dir):
    """fp16_naive really diverges (fp16 AdamW states, no loss scaling); amp_bf16 really fails: its run finds
    a corrupt checkpoint (as a disk error would leave) and refuses it. The others complete, the sweep goes
    on and exits non-zero; re-running skips what is done and leaves the failure alone unless asked."""
    results.claim_output_dir(tmp_path, *tiny_run.setup(small_cache_dir, tmp_path, *FAST))  # as its writer did
    broken = tmp_path / "checkpoints" / tiny_run.run_id(small_cache_dir, tmp_path, "amp_bf16", 0, *FAST) / "last"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{ garbage")
    sweep_flags = ["--config", "fp32_baseline,amp_bf16,fp16_naive", *FAST]

    first = tiny_run.run(small_cache_dir, tmp_path, *sweep_flags)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    by_config = {r["config"]: r for r in tiny_run.rows(tmp_path)}
    assert {c: r["status"] for c, r in by_config.items()} == {
        "fp32_baseline": "completed", "amp_bf16": "failed", "fp16_naive": "diverged"}
    assert by_config["amp_bf16"]["error"].startswith("CheckpointError: checkpoint") and "unreadable" in \
        by_config["amp_bf16"]["error"]
    assert 1 <= by_config["fp16_naive"]["diverged_at_step"] <= 6
    assert by_config["fp32_baseline"]["steps"] == 6 and by_config["fp32_baseline"]["micro_f1"] is not None
    assert "1 run(s) failed" in first.stderr

    second = tiny_run.run(small_cache_dir, tmp_path, *sweep_flags)  # runs nothing: two results and a failure
    assert "fp32_baseline seed 0: already completed, skipping" in second.stdout
    assert "fp16_naive seed 0: already diverged" in second.stdout
    assert "amp_bf16 seed 0: already failed" in second.stdout and "--retry_failed" in second.stdout
    assert second.returncode == 1 and len(tiny_run.rows(tmp_path)) == 3
    # Retrying the failure from scratch (its checkpoint is the problem, so --fresh discards it).
    third = tiny_run.run(small_cache_dir, tmp_path, "--config", "amp_bf16", *FAST, "--retry_failed", "--fresh")
    assert third.returncode == 0, third.stderr[-3000:]
    newest = results.latest_per_run(tiny_run.rows(tmp_path))
    assert sorted(r["status"] for r in newest.values()) == ["completed", "completed", "diverged"]
    assert len(tiny_run.rows(tmp_path)) == 4  # the failed row stays; the newest row of a run counts


@pytest.mark.slow
def test_two_concurrent_sweeps_share_one_output_dir(tmp_path, small_cache_dir):
    """Started together on the same grid: every run is trained exactly once and results.jsonl stays valid."""
    flags = ["--config", "fp32_baseline,amp_bf16", *FAST[:4]]
    processes = [tiny_run.start(small_cache_dir, tmp_path, *flags) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    rows, problems = results.read_results(tmp_path)
    assert problems == []
    assert sorted((r["config"], r["status"]) for r in rows) == [("amp_bf16", "completed"), ("fp32_baseline", "completed")]
    assert not any("resuming" in out for out in outputs)  # nobody picked up a run the other was training


def _claim_after(barrier, output_dir: str, fingerprint: str, outcomes) -> None:
    barrier.wait()
    try:
        results.claim_output_dir(output_dir, fingerprint, {"setup": fingerprint})
        outcomes.put(("claimed", fingerprint))
    except results.SetupMismatch:
        outcomes.put(("refused", fingerprint))


def test_setups_started_at_the_same_moment_cannot_both_claim_a_folder(tmp_path):
    """claim_output_dir checks and writes setup.json under one lock: of eight setups released at once, exactly
    one owns the folder."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier, outcomes = context.Barrier(8), context.Queue()
    processes = [context.Process(target=_claim_after, args=(barrier, str(tmp_path / "out"), f"setup{i}", outcomes))
                 for i in range(8)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    got = [outcomes.get(timeout=5) for _ in processes]
    winners = [fingerprint for outcome, fingerprint in got if outcome == "claimed"]
    assert len(winners) == 1, got
    assert json.loads((tmp_path / "out" / "setup.json").read_text())["fingerprint"] == winners[0]


def test_non_utf8_results_line_is_reported_like_a_torn_one(tmp_path, capsys):
    row = {"experiment": "e", "run_id": "r1", "config": "fp32_baseline", "seed": 0, "status": "completed",
           "setup_fingerprint": "s"}
    results.append_result(tmp_path, row)
    with open(tmp_path / "results.jsonl", "ab") as f:
        f.write(b'{"run_id": "r\xff2"}\n')
    results.append_result(tmp_path, {**row, "run_id": "r3"})
    rows, problems = results.read_results(tmp_path)
    assert [r["run_id"] for r in rows] == ["r1", "r3"]
    assert len(problems) == 1 and "results.jsonl:2: malformed line" in problems[0] and "utf-8" in problems[0]


def test_a_failed_row_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """A failed fsync (ENOSPC) after the bytes were written: the append is undone, the file as it was."""
    import errno

    row = {"experiment": "e", "run_id": "r1", "config": "fp32_baseline", "seed": 0, "status": "completed"}
    results.append_result(tmp_path, row)
    before = (tmp_path / "results.jsonl").read_bytes()
    real_fsync = os.fsync

    def disk_full(fd):  # the bytes were written, reaching the disk fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        results.append_result(tmp_path, {**row, "run_id": "r2"})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (tmp_path / "results.jsonl").read_bytes() == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_dir_is_refused_in_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(FolderRefused, match="is not writable by this user"):
            results.claim_output_dir(locked / "out", "s", {})
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def _fake_run_script(tmp_path: Path, body: str) -> Path:
    """A stand-in for run.py: records that it ran (config and seed), then does `body`."""
    script = tmp_path / "fake_run.py"
    script.write_text("import json, os, signal, sys\n"
                      "config, seed = sys.argv[sys.argv.index('--config') + 1], int(sys.argv[sys.argv.index('--seed') + 1])\n"
                      f"open({str(tmp_path / 'ran.txt')!r}, 'a').write(f'{{config}} {{seed}}\\n')\n" + body)
    return script


def _ran(tmp_path: Path) -> list[str]:
    path = tmp_path / "ran.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_a_sweep_child_killed_by_a_signal_is_interrupted_not_failed(tmp_path, capsys):
    """SIGKILL (the OOM killer, a user's kill) writes no `failed` row: the same command runs the run again."""
    out = tmp_path / "out"
    script = _fake_run_script(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)\n")
    runs = sweep.grid(["fp32_baseline"], 0, 1)
    grid = sweep.Grid(runs, str(out), "s", "e", skip_reasons={"fp32_baseline": None})
    assert sweep.run_sweep(str(script), grid, []) == 1
    assert "killed by SIGKILL" in capsys.readouterr().err and results.read_results(out) == ([], [])
    assert sweep.run_sweep(str(script), grid, []) == 1
    assert _ran(tmp_path) == ["fp32_baseline 0", "fp32_baseline 0"]


def test_a_skip_is_re_evaluated_when_its_reason_no_longer_applies(tmp_path, capsys):
    """Skipped under --max_cpu_slowdown 4, the config runs under --max_cpu_slowdown none in the same folder."""
    out = tmp_path / "out"
    rid = results.run_id("e", "amp_bf16", 0, "s")
    results.append_result(out, {"experiment": "e", "run_id": rid, "config": "amp_bf16", "seed": 0,
                                "status": "skipped", "reason": "bfloat16 70x slower", "setup_fingerprint": "s"})
    script = _fake_run_script(tmp_path, "")
    runs = sweep.grid(["amp_bf16"], 0, 1)
    too_slow = sweep.Grid(runs, str(out), "s", "e", skip_reasons={"amp_bf16": "bfloat16 71x slower"})
    sweep.run_sweep(str(script), too_slow, [])
    assert _ran(tmp_path) == [] and "still skipped (bfloat16 71x slower)" in capsys.readouterr().out
    sweep.run_sweep(str(script), sweep.Grid(runs, str(out), "s", "e", skip_reasons={"amp_bf16": None}), [])
    assert _ran(tmp_path) == ["amp_bf16 0"]


def test_hostile_or_wrong_typed_rows_are_reported_like_torn_lines(tmp_path):
    """A deeply nested line (RecursionError in json), wrong-typed fields and a run id that is a path are each one
    reported malformed line; the valid rows around them are read."""
    good = {"experiment": "e", "run_id": "r1", "config": "fp32_baseline", "seed": 0, "status": "completed",
            "setup_fingerprint": "s"}
    bad = ["[" * 100_000 + "]" * 100_000, {**good, "seed": "0"}, {**good, "seed": [0]}, {**good, "steps": "5"},
           {**good, "env": "linux"}, {**good, "train_config": None, "seed": True}, {**good, "run_id": "x" * 300},
           {**good, "run_id": "../../user/notes"}, {**good, "status": "great"}, {"status": "completed"}]
    results.append_result(tmp_path, good)
    with open(tmp_path / "results.jsonl", "a") as f:
        for line in bad:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    results.append_result(tmp_path, {**good, "run_id": "r2"})
    rows, problems = results.read_results(tmp_path)
    assert [r["run_id"] for r in rows] == ["r1", "r2"]
    assert len(problems) == len(bad) and all("malformed line" in p for p in problems), problems


def test_the_sweep_line_says_its_time_so_far_and_left_once_a_run_has_finished():
    from dtype_bench.sweep import sweep_time

    assert sweep_time(5.0, [], 4) == " (sweep 5s)"  # no finished run to estimate from
    assert sweep_time(70.0, [20.0, 40.0], 3) == " (sweep 1m10s, ~1m30s left (3 to go))"


def test_a_sweep_forks_each_run_from_a_server_that_has_imported_the_preload(tmp_path):
    """Each run is its own process (its pid differs from the sweep's and from the other runs'), forked by the
    forkserver: the preloaded module is already imported when the run's script starts, and the script's exit
    code is the run's."""
    out = tmp_path / "out"
    script = _fake_run_script(tmp_path, (
        "import multiprocessing\n"
        f"open({str(tmp_path / 'seen.txt')!r}, 'a').write(json.dumps(["
        "os.getpid(), 'dtype_bench.progress' in sys.modules, multiprocessing.parent_process() is not None]) + '\\n')\n"
        "sys.exit(3 if seed == 1 else 0)\n"))
    grid = sweep.Grid(sweep.grid(["fp32_baseline"], 0, 2), str(out), "s", "e", skip_reasons={"fp32_baseline": None})
    assert "dtype_bench.progress" in sys.modules  # imported here; the server is a fresh interpreter
    assert sweep.run_sweep(str(script), grid, [], preload=["dtype_bench.progress"]) == 1  # no row: failed
    seen = [json.loads(line) for line in (tmp_path / "seen.txt").read_text().splitlines()]
    assert [forked for _, _, forked in seen] == [True, True] and [pre for _, pre, _ in seen] == [True, True]
    assert len({pid for pid, _, _ in seen} | {os.getpid()}) == 3
    errors = [r["error"] for r in results.read_results(out)[0]]
    assert ["exited with code 0 without" in errors[0], "exited with code 3 without" in errors[1]] == [True, True]


def test_a_sweeps_runs_use_the_matmul_slowdowns_the_sweep_measured(tmp_path, monkeypatch):
    """The CPU matmul slowdowns measured in the sweep's process are each run's (cpu.inherit_slowdowns): a run
    makes the sweep's skip/emulate decision and measures nothing. Here the parent's value is one no
    measurement gives, and the run's process would measure if it had none."""
    monkeypatch.setattr(cpu, "_SLOWDOWNS", {torch.bfloat16: 12345.0})
    out = tmp_path / "out"
    script = _fake_run_script(tmp_path, (
        "import torch\nfrom dtype_bench import cpu\n"
        f"open({str(tmp_path / 'seen.txt')!r}, 'a').write(json.dumps([cpu.matmul_slowdown(torch.bfloat16), "
        "sorted(str(d) for d in cpu.measured_slowdowns())]) + '\\n')\n"
        "sys.exit(0)\n"))
    grid = sweep.Grid(sweep.grid(["fp32_baseline"], 0, 1), str(out), "s", "e", skip_reasons={"fp32_baseline": None})
    sweep.run_sweep(str(script), grid, [], preload=[])
    assert json.loads((tmp_path / "seen.txt").read_text()) == [12345.0, ["torch.bfloat16"]]


def test_a_sweep_records_skipped_runs_itself_and_estimates_time_from_trained_ones(tmp_path, capsys):
    """With `record_skip`, a skipped config starts no process: the sweep writes its row (once: a second sweep
    finds it done), and the time left counts only the runs that train."""
    out = tmp_path / "out"
    script = _fake_run_script(tmp_path, (  # a completed row, as a run writes it
        f"open({str(out / 'results.jsonl')!r}, 'a').write(json.dumps({{'experiment': 'e', 'run_id': "
        "f'e-{config}-seed{seed}-s', 'config': config, 'seed': seed, 'status': 'completed', "
        "'setup_fingerprint': 's'}) + '\\n')\n"))
    runs = sweep.grid(["fp32_baseline", "amp_bf16"], 0, 2)
    grid = sweep.Grid(runs, str(out), "s", "e", skip_reasons={"fp32_baseline": None, "amp_bf16": "bf16 60x slower"})
    recorded = []

    def record_skip(spec, reason):
        recorded.append((spec.config, spec.seed, reason))
        results.append_result(out, {"experiment": "e", "run_id": grid.run_id(spec), "config": spec.config,
                                    "seed": spec.seed, "status": "skipped", "reason": reason,
                                    "setup_fingerprint": "s"})

    assert sweep.run_sweep(str(script), grid, [], record_skip=record_skip) == 0
    assert _ran(tmp_path) == ["fp32_baseline 0", "fp32_baseline 1"]
    assert recorded == [("amp_bf16", 0, "bf16 60x slower"), ("amp_bf16", 1, "bf16 60x slower")]
    printed = capsys.readouterr().out
    assert "[3/4] fp32_baseline seed 1 (sweep " in printed and "left (1 to go))" in printed  # not 3 to go
    assert sweep.run_sweep(str(script), grid, [], record_skip=record_skip) == 0
    assert len(recorded) == 2 and "still skipped (bf16 60x slower)" in capsys.readouterr().out
