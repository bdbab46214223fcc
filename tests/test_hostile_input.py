"""Hostile or odd input to the prepare and run scripts ends in one `error:` line with exit status 2 and leaves the
folder as it was: a device as the source, unreadable or encrypted zip members, non-UTF-8 or unbounded text, a
path-looking --model_name that does not exist, a downloads folder that is not ours, token or label ids outside the
cache's vocabulary, a full disk while building a cache."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import pytest

import tiny_run
from experiments.classification import prepare_data as cls_prepare
from experiments.classification import run as cls_run
from experiments.classification.sources import InputLimits
from experiments.lm import prepare_data as lm_prepare
from experiments.lm import run as lm_run

LM_SMALL = ["--preset", "tiny", "--n_layer", "1", "--n_head", "1", "--n_embd", "64", "--block_size", "32",
            "--batch_size", "4", "--max_steps", "2", *tiny_run.PINNED]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its content's hash ("dir" for a folder)."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def patched_zip(path: Path, local_offset: int, central_offset: int, value: int) -> Path:
    """A one-member zip (train.jsonl, stored) with a 2-byte field of both its headers set to `value`."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train.jsonl", "{}\n")
    data = bytearray(path.read_bytes())
    for header, offset in ((b"PK\x03\x04", local_offset), (b"PK\x01\x02", central_offset)):
        start = data.find(header) + offset
        data[start : start + 2] = struct.pack("<H", value)
    path.write_bytes(bytes(data))
    return path


def written(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def damaged_cls_cache(tmp_path: Path, small_cache: Path, field: str) -> Path:
    """A copy of the small cache whose meta.json claims a vocabulary / label space of 10: ids beyond it."""
    cache = shutil.copytree(small_cache, tmp_path / "cache")
    meta = json.loads((cache / "meta.json").read_text())
    if field == "vocab_size":
        meta["tokenizer"]["vocab_size"] = 10
    else:
        meta["num_labels"] = 10
    (cache / "meta.json").write_text(json.dumps(meta))
    return cache


def damaged_lm_cache(tmp_path: Path) -> Path:
    cache = lm_prepare.prepare("synthetic-ids", tmp_path / "lmcache", tokenizer="words:1000", val_fraction=0.1,
                               synthetic_docs=40)
    meta = json.loads((cache / "meta.json").read_text())
    meta["tokenizer"]["vocab_size"] = 100
    (cache / "meta.json").write_text(json.dumps(meta))
    return cache


def missing_model_name(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Callable[[list[str]], int], list[str]]:
    """Refused before the tiny preset builds its cache under the working directory."""
    request.getfixturevalue("monkeypatch").chdir(tmp_path)
    return cls_run.main, [*tiny_run.SMALL, "--config", "fp32_baseline", "--model_name", str(tmp_path / "nonexistent"),
                          "--output_dir", str(tmp_path / "out")]


def small_vocabulary_encoder(tmp_path: Path) -> Path:
    """A save_pretrained encoder config of 50 tokens, fewer than the small cache's tokenizer has."""
    from transformers import RobertaConfig

    RobertaConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                  intermediate_size=128).save_pretrained(tmp_path / "encoder")
    return tmp_path / "encoder"


Case = Callable[[Path, pytest.FixtureRequest], tuple[Callable[[list[str]], int], list[str]]]
CASES: dict[str, Case] = {
    "lm prepare of /dev/zero": lambda t, r: (lm_prepare.main, ["--source", "/dev/zero", "--output_dir", str(t / "c")]),
    "zip member with an unsupported compression method": lambda t, r: (cls_prepare.main, [
        "--source", str(patched_zip(t / "d64.zip", 8, 10, 9)), "--output_dir", str(t / "c"), "--tokenizer", "bpe:300"]),
    "encrypted zip member": lambda t, r: (cls_prepare.main, [
        "--source", str(patched_zip(t / "enc.zip", 6, 8, 1)), "--output_dir", str(t / "c"), "--tokenizer", "bpe:300"]),
    "lm prepare of non-UTF-8 text": lambda t, r: (lm_prepare.main, [
        "--source", str(written(t / "latin1.txt", "Größe\n".encode("latin-1"))),
        "--output_dir", str(t / "c"), "--tokenizer", "bpe:300"]),
    "lm prepare of a line past the default --max_line_bytes": lambda t, r: (lm_prepare.main, [
        "--source", str(written(t / "long.txt", b"a" * (InputLimits.max_line_bytes + 1))),
        "--output_dir", str(t / "c"), "--tokenizer", "bpe:300"]),
    "a path-looking --model_name that does not exist": lambda t, r: missing_model_name(t, r),
    "classification token ids outside the vocabulary": lambda t, r: (cls_run.main, [
        *tiny_run.SMALL, "--config", "fp32_baseline", "--output_dir", str(t / "out"),
        "--data_dir", str(damaged_cls_cache(t, r.getfixturevalue("small_cache_dir"), "vocab_size"))]),
    "classification label ids outside the label space": lambda t, r: (cls_run.main, [
        *tiny_run.SMALL, "--config", "fp32_baseline", "--output_dir", str(t / "out"),
        "--data_dir", str(damaged_cls_cache(t, r.getfixturevalue("small_cache_dir"), "num_labels"))]),
    "a pretrained encoder with a smaller vocabulary than the cache": lambda t, r: (cls_run.main, [
        *tiny_run.SMALL, "--config", "fp32_baseline", "--output_dir", str(t / "out"), "--model_name",
        str(small_vocabulary_encoder(t)), "--data_dir", str(r.getfixturevalue("small_cache_dir"))]),
    "lm token ids outside the vocabulary": lambda t, r: (lm_run.main, [
        *LM_SMALL, "--config", "fp32_baseline", "--output_dir", str(t / "out"),
        "--data_dir", str(damaged_lm_cache(t))]),
    "disk full while preparing the classification cache": lambda t, r: (cls_prepare.main, [
        "--source", "synthetic", "--synthetic_docs", "600", "--synthetic_labels", "300", "--tokenizer", "bpe:1000",
        "--max_length", "64", "--output_dir", str(r.getfixturevalue("small_disk") / "c")]),
    "disk full while preparing the lm cache": lambda t, r: (lm_prepare.main, [
        "--source", "synthetic", "--synthetic_docs", "200", "--val_fraction", "0.1", "--tokenizer", "bpe:300",
        "--output_dir", str(r.getfixturevalue("small_disk") / "c")]),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_ends_in_one_line_with_exit_2_and_writes_nothing(case, tmp_path, request, capsys):
    main, argv = CASES[case](tmp_path, request)
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out + err, (code, out[-2000:], err[-2000:])
    after = snapshot(tmp_path)
    # Building a cache takes its lock first (an empty file beside it, kept: other processes may wait on it).
    lock = "disk/.c.lock" if case.startswith("disk full") else None
    assert {k: v for k, v in after.items() if k != lock} == before, (errors, set(after) ^ set(before))
    if lock:
        assert after[lock] == hashlib.sha256(b"").hexdigest()
        assert "No space left on device" in errors[0], errors


def test_a_device_as_the_source_is_refused_at_once_not_read_forever(tmp_path):
    """Run as a file: `--source /dev/zero` would otherwise be hashed or unzipped without end."""
    proc = subprocess.run([sys.executable, str(tiny_run.ROOT / "experiments/classification/prepare_data.py"),
                           "--source", "/dev/zero", "--output_dir", str(tmp_path / "c"), "--tokenizer", "bpe:300"],
                          env=tiny_run.ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: /dev/zero is not a regular file or folder (a device, pipe or socket): pass a file or folder"], proc
    assert list(tmp_path.iterdir()) == []
