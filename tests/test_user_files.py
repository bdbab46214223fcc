"""Nothing a user owns is written, moved or deleted: links in our folders are refused, never written through;
look-alike leftovers are left alone; a failed append leaves results.jsonl byte-identical."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dtype_bench import checkpoint, results
from dtype_bench.io import FolderRefused, append_jsonl, atomic_directory, recover_interrupted_writes
from interrupt import killed_at_rename

USER_BYTES = b"a user's file, not ours\n" * 1250  # 30,000 bytes


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "user" / "notes.txt"
    path.parent.mkdir()
    path.write_bytes(USER_BYTES)
    return path


def test_a_step_log_that_is_a_link_is_refused_fresh_and_on_resume(tmp_path, user_file):
    log = tmp_path / "out" / "logs" / "run.jsonl"
    log.parent.mkdir(parents=True)
    log.symlink_to(user_file)
    for kwargs in ({}, {"append": True}, {"resume_at": 9396}):
        with pytest.raises(FolderRefused, match="symbolic link"):
            results.StepLog(log, **kwargs)
        assert user_file.read_bytes() == USER_BYTES, kwargs


def test_a_results_file_or_its_lock_that_is_a_link_is_refused(tmp_path, user_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").symlink_to(user_file)
    with pytest.raises(FolderRefused, match="symbolic link"):
        append_jsonl(out / "results.jsonl", {"run_id": "r"})
    (out / "results.jsonl").unlink()
    (out / "results.jsonl.lock").unlink(missing_ok=True)
    (out / "results.jsonl.lock").symlink_to(user_file)  # filelock would open it with O_TRUNC
    with pytest.raises(FolderRefused, match="lock file"):
        append_jsonl(out / "results.jsonl", {"run_id": "r"})
    assert user_file.read_bytes() == USER_BYTES
    assert not (out / "results.jsonl").exists()


def _checkpointed(tmp_path: Path) -> tuple[checkpoint.RunCheckpoints, torch.optim.Optimizer, object, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ckpt = checkpoint.RunCheckpoints(tmp_path / "run", model, {"run_id": "r"})
    best = ckpt.save_best(2, {"micro_f1": 0.5})
    ckpt.save(optimizer, scheduler, scaler, progress={"step": 2}, best_dir=best)
    return ckpt, optimizer, scheduler, scaler


def _rewrite_state(ckpt: checkpoint.RunCheckpoints, **changes) -> None:
    """Edit `last`'s state.pt and re-record its checksum, as someone crafting a checkpoint would."""
    from dtype_bench.io import file_checksums

    state_path = ckpt.last_dir / checkpoint.STATE_FILE
    state = torch.load(state_path, weights_only=True)
    torch.save({**state, **changes}, state_path)
    manifest = json.loads((ckpt.last_dir / checkpoint.MANIFEST).read_text())
    manifest["files"].update(file_checksums(ckpt.last_dir, [checkpoint.STATE_FILE]))
    (ckpt.last_dir / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_naming_best_weights_outside_its_run_is_refused(tmp_path):
    ckpt, *training = _checkpointed(tmp_path)
    outside = tmp_path / "user" / "evilbest"
    outside.parent.mkdir()
    (ckpt.directory / "best-step2").rename(outside)  # a complete, valid best folder, but not the run's own
    _rewrite_state(ckpt, best_dir="../../user/evilbest")
    with pytest.raises(checkpoint.CheckpointError, match="not a best-step folder"):
        ckpt.restore(*training)
    (ckpt.directory / "best-step2").symlink_to(outside)
    _rewrite_state(ckpt, best_dir="best-step2")
    with pytest.raises(checkpoint.CheckpointError, match="symbolic link"):
        ckpt.restore(*training)
    assert sorted(p.name for p in outside.iterdir()) == sorted([checkpoint.MODEL_FILE, checkpoint.MANIFEST])


def test_a_manifest_listing_a_file_outside_the_checkpoint_is_refused(tmp_path):
    ckpt, *training = _checkpointed(tmp_path)
    manifest_path = ckpt.last_dir / checkpoint.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    passwd = Path("/etc/passwd")
    manifest["files"]["../../../../../../../etc/passwd"] = {"bytes": passwd.stat().st_size, "sha256": "x"}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match="outside"):
        ckpt.restore(*training)


def _rebuild(folder: Path) -> None:
    with atomic_directory(folder, "meta.json", "fingerprint") as tmp:
        (tmp / "meta.json").write_text(json.dumps({"fingerprint": "b"}))


def test_look_alike_leftovers_of_a_user_are_never_removed_or_renamed(tmp_path):
    """A user's `.c2.old-mybackup` beside our cache `c2`, and `.c9.old-2024` where no `c9` exists yet: neither is
    removed, renamed or reported; our own leftovers (made by killing a real swap) are."""
    for name in (".c2.old-mybackup", ".c9.old-2024", ".c2.tmp-draft"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.bin").write_bytes(USER_BYTES)
    with atomic_directory(tmp_path / "c2", "meta.json", "fingerprint") as tmp:
        (tmp / "meta.json").write_text(json.dumps({"fingerprint": "a"}))
    assert recover_interrupted_writes(tmp_path, "*") == []

    killed_at_rename(_rebuild, (tmp_path / "c2",), r"^\.c2\.tmp-")
    done = recover_interrupted_writes(tmp_path, "*")
    assert len(done) == 2 and done[0].startswith("restored") and "left by an interrupted write" in done[1], done
    assert json.loads((tmp_path / "c2" / "meta.json").read_text()) == {"fingerprint": "a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c2.old-mybackup", ".c2.tmp-draft", ".c9.old-2024", "c2"]
    for name in (".c2.old-mybackup", ".c9.old-2024", ".c2.tmp-draft"):
        assert (tmp_path / name / "data.bin").read_bytes() == USER_BYTES


def test_a_full_disk_during_the_append_leaves_results_byte_identical(small_disk):
    path = small_disk / "results.jsonl"
    for i in range(20):
        append_jsonl(path, {"run_id": f"r{i}", "status": "completed"})
    before = path.read_bytes()
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk up to its last page
        while os.write(fd, b"\0" * 512):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    big_row = {"run_id": "big", "notes": "x" * 6000}  # more than a page of slack, less than a write buffer
    with pytest.raises(OSError) as raised:
        append_jsonl(path, big_row)
    assert raised.value.errno == 28  # ENOSPC
    assert path.read_bytes() == before
    os.unlink(filler)
    append_jsonl(path, big_row)
    assert path.read_bytes().startswith(before) and path.read_bytes().endswith(b'"' + b"x" * 6000 + b'"}\n')


def test_a_full_disk_while_run_py_builds_its_preset_cache_is_one_line(small_disk, monkeypatch, capsys):
    """`run.py --preset tiny` builds its cache on first use: a full disk there ends in one line and exit 2."""
    from experiments.classification.run import main

    monkeypatch.chdir(small_disk)
    code = main(["--config", "fp32_baseline", "--preset", "tiny", "--output_dir", str(small_disk / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "space" in err[0], err
    assert not (small_disk / "out").exists()
