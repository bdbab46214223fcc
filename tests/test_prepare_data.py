"""experiments/classification/prepare_data.py and dtype_bench.tokenization: the cache it writes is what data.py
reads, every source kind (folder, zip, URL, hub, synthetic) goes through it, reuse and rebuild follow the
fingerprint, and every kind of bad input stops with one clear error and no cache."""
from __future__ import annotations

import http.server
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from dtype_bench.io import FolderRefused, sha256_file
from interrupt import killed_at_rename
from dtype_bench.synthetic import write_jsonl_splits
from dtype_bench.tokenization import (
    SPECIAL_TOKENS, TokenizerError, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
from experiments.classification import data
from experiments.classification import prepare_data
from experiments.classification.prepare_data import PrepareError, prepare
from experiments.classification.prepare_data import main as prepare_main
from experiments.classification import sources
from experiments.classification.sources import DOWNLOADS_MARKER

SMALL_BPE = "bpe:2000"


def small_archive(folder: Path, n_train: int = 40, n_validation: int = 10, n_test: int = 10) -> Path:
    """A valid archive-schema folder, fast to prepare (50 concepts so labels repeat)."""
    write_jsonl_splits(folder, n_train, n_validation, n_test, seed=3, num_labels=50)
    return folder


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_records(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def zip_folder(folder: Path, zip_path: Path, prefix: str = "dataset/") -> Path:
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.glob("*.jsonl")):
            archive.write(path, prefix + path.name)
    return zip_path


def assert_consistent_cache(cache: Path) -> data.CacheMeta:
    """Everything data.py relies on: offsets, special tokens, lengths, label ranges, unseen counts."""
    meta = data.read_meta(cache)
    labels = json.loads((cache / "labels.json").read_text())
    assert len(labels) == meta.num_labels and labels == sorted(set(labels))
    tokenizer = AutoTokenizer.from_pretrained(cache / "tokenizer")
    assert meta.vocab_size == len(tokenizer) and meta.pad_token_id == tokenizer.pad_token_id
    for split in data.SPLITS:
        part = data.TokenizedSplit(cache, split)
        assert len(part) == meta.raw["splits"][split] > 0
        for offsets, values in ((part.doc_offsets, part.input_ids), (part.label_offsets, part.label_ids)):
            assert offsets[0] == 0 and offsets[-1] == len(values) and np.all(np.diff(offsets) >= 0)
        assert part.input_ids.dtype == np.int32 and part.label_ids.dtype == np.int32
        lengths = np.diff(part.doc_offsets)
        assert lengths.min() >= 2 and lengths.max() <= meta.max_length
        assert np.all(part.input_ids[part.doc_offsets[:-1]] == tokenizer.cls_token_id)
        assert np.all(part.input_ids[part.doc_offsets[1:] - 1] == tokenizer.sep_token_id)
        assert np.all(np.asarray(part.input_ids) < meta.vocab_size)
        assert len(part.label_ids) == 0 or np.asarray(part.label_ids).max() < meta.num_labels
        assert len(part.n_unseen_labels) == len(part)
        assert int(part.n_unseen_labels.sum()) == meta.raw["labels_not_in_train"][split]
    assert meta.raw["labels_not_in_train"]["train"] == 0
    return meta


def assert_no_cache(output_dir: Path) -> None:
    assert not output_dir.exists()
    assert not list(output_dir.parent.glob(f".{output_dir.name}.tmp-*"))


# ------------------------------------------------------------------------------------------------- real sample


@pytest.fixture(scope="module")
def real_cache(real_sample_dir, tmp_path_factory) -> Path:
    return prepare(str(real_sample_dir), tmp_path_factory.mktemp("real") / "cache", tokenizer=SMALL_BPE)


def test_real_sample_folder(real_cache, real_sample_dir):
    meta = assert_consistent_cache(real_cache)
    train = read_records(real_sample_dir / "train.jsonl")
    dev = read_records(real_sample_dir / "dev.jsonl")
    train_concepts = {c for r in train for c in r["eurovoc_concepts"]}
    dev_concepts = {c for r in dev for c in r["eurovoc_concepts"]}
    # The sample's README: 339 concepts in train, 342 in dev, 214 of dev's not in train.
    assert (len(train_concepts), len(dev_concepts), len(dev_concepts - train_concepts)) == (339, 342, 214)
    assert json.loads((real_cache / "labels.json").read_text()) == sorted(train_concepts)
    # No test.jsonl: half of dev (seeded) became test, and meta says so.
    assert meta.raw["splits"] == {"train": 100, "validation": 50, "test": 50}
    assert "no test split" in meta.raw["source"]["notes"][0]
    unseen_gold = sum(len(set(r["eurovoc_concepts"]) - train_concepts) for r in dev)
    assert meta.raw["labels_not_in_train"]["validation"] + meta.raw["labels_not_in_train"]["test"] == unseen_gold

    stats = json.loads((real_cache / "stats.json").read_text())
    assert stats["num_labels"] == 339
    groups = {s: stats["splits"][s]["label_groups"] for s in data.SPLITS}
    assert groups["train"]["few_shot"] == {"labels": 339, "assignments": 522}  # none in > 50 of 100 documents
    assert groups["validation"]["zero_shot"]["assignments"] + groups["test"]["zero_shot"]["assignments"] == unseen_gold
    assert stats["splits"]["train"]["tokens_before_truncation"]["max"] > 512
    assert 0 < stats["splits"]["train"]["fraction_truncated"] < 1
    assert "| documents | 100 | 50 | 50 |" in (real_cache / "stats.md").read_text()


def test_real_sample_tokens_match_the_tokenizer_and_read_back(real_cache, real_sample_dir):
    record = read_records(real_sample_dir / "train.jsonl")[0]
    text = "\n".join([record["title"], record["header"], record["recitals"], "\n".join(record["main_body"])])
    tokenizer = AutoTokenizer.from_pretrained(real_cache / "tokenizer")
    expected = tokenizer(text, truncation=True, max_length=512)["input_ids"]
    part = data.TokenizedSplit(real_cache, "train")
    assert part.tokens(0).tolist() == expected
    labels = json.loads((real_cache / "labels.json").read_text())
    assert [labels[i] for i in part.labels(0)] == record["eurovoc_concepts"]
    meta = data.read_meta(real_cache)
    batch = next(data.eval_batches(part, 4, meta.num_labels, meta.pad_token_id))
    assert batch.targets.shape == (4, 339) and batch.targets[0].sum() == len(record["eurovoc_concepts"])


def test_real_sample_zip_gives_the_same_cache(real_cache, real_sample_dir, tmp_path):
    zip_path = zip_folder(real_sample_dir, tmp_path / "dataset.zip")
    cache = prepare(str(zip_path), tmp_path / "from_zip", tokenizer=SMALL_BPE)
    meta = assert_consistent_cache(cache)
    assert meta.raw["source"]["sha256"] == sha256_file(zip_path)
    for split in data.SPLITS:
        for name in data.ARRAYS:
            assert np.array_equal(np.load(cache / f"{split}.{name}.npy"), np.load(real_cache / f"{split}.{name}.npy"))


# ------------------------------------------------------------------------------------------- reuse and rebuild


def test_second_prepare_reuses_and_changes_rebuild(tmp_path, capsys):
    source = small_archive(tmp_path / "src")
    out = tmp_path / "cache"
    first = data.read_meta(prepare(str(source), out, tokenizer=SMALL_BPE, max_length=64))
    built_at = (out / "meta.json").stat().st_mtime_ns
    capsys.readouterr()

    prepare(str(source), out, tokenizer=SMALL_BPE, max_length=64)
    assert "reusing cache" in capsys.readouterr().out
    assert (out / "meta.json").stat().st_mtime_ns == built_at

    changed_option = data.read_meta(prepare(str(source), out, tokenizer=SMALL_BPE, max_length=32))
    assert changed_option.fingerprint != first.fingerprint and changed_option.max_length == 32

    records = read_records(source / "train.jsonl")
    records[0]["title"] += " amended"
    write_records(source / "train.jsonl", records)
    changed_input = data.read_meta(prepare(str(source), out, tokenizer=SMALL_BPE, max_length=32))
    assert changed_input.fingerprint != changed_option.fingerprint

    capsys.readouterr()
    prepare(str(source), out, tokenizer=SMALL_BPE, max_length=32, force=True)
    assert "reusing" not in capsys.readouterr().out


def test_zones_choose_the_text(tmp_path):
    source = small_archive(tmp_path / "src")
    cache = prepare(str(source), tmp_path / "titles", tokenizer=SMALL_BPE, max_length=512, zones=["title"])
    tokenizer = AutoTokenizer.from_pretrained(cache / "tokenizer")
    title = read_records(source / "train.jsonl")[0]["title"]
    assert data.TokenizedSplit(cache, "train").tokens(0).tolist() == tokenizer(title)["input_ids"]
    with pytest.raises(PrepareError, match="zones"):
        prepare(str(source), tmp_path / "bad", tokenizer=SMALL_BPE, zones=["title", "preamble"])


# ------------------------------------------------------------------------------------------------ tokenizers


def test_bpe_tokenizer_is_roberta_like_deterministic_and_reloads(tmp_path):
    texts = [r["recitals"] for r in read_records(small_archive(tmp_path / "src") / "train.jsonl")]
    first = train_bpe_tokenizer(texts, 600, tmp_path / "a")
    second = train_bpe_tokenizer(texts, 600, tmp_path / "b")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second) == tokenizer_fingerprint(reloaded)
    assert reloaded.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    ids = reloaded("Whereas: the Member States")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and reloaded.decode(ids[1:-1]) == "Whereas: the Member States"
    other = train_bpe_tokenizer(texts[:5], 600, tmp_path / "c")
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(first)


def test_tokenizer_specs(tmp_path):
    with pytest.raises(TokenizerError, match="local tokenizer directory or bpe:SIZE"):
        load_tokenizer("dtype-bench-tests/no-such-tokenizer")
    with pytest.raises(TokenizerError, match="bpe:SIZE"):
        load_tokenizer("bpe:many")
    with pytest.raises(TokenizerError, match="train_texts"):
        load_tokenizer("bpe:1000")
    saved = train_bpe_tokenizer(["a small corpus of words"] * 10, 300, tmp_path / "tok")
    assert tokenizer_fingerprint(load_tokenizer(str(tmp_path / "tok"))) == tokenizer_fingerprint(saved)


def test_prepare_with_a_local_tokenizer_directory(tmp_path):
    source = small_archive(tmp_path / "src")
    bpe_cache = prepare(str(source), tmp_path / "bpe", tokenizer=SMALL_BPE, max_length=64)
    local_cache = prepare(str(source), tmp_path / "local", tokenizer=str(bpe_cache / "tokenizer"), max_length=64)
    fingerprints = [data.read_meta(cache).raw["tokenizer"]["fingerprint"] for cache in (local_cache, bpe_cache)]
    assert fingerprints[0] == fingerprints[1]
    assert np.array_equal(np.load(local_cache / "test.input_ids.npy"), np.load(bpe_cache / "test.input_ids.npy"))


# ---------------------------------------------------------------------------------------------- other sources


def test_synthetic_source_and_split_sizes(tmp_path):
    cache = prepare("synthetic", tmp_path / "syn", tokenizer=SMALL_BPE, max_length=128, synthetic_docs=200,
                    synthetic_labels=100, synthetic_seed=1)
    meta = assert_consistent_cache(cache)
    assert meta.raw["splits"] == {"train": 160, "validation": 20, "test": 20}
    assert meta.raw["source"]["kind"] == "synthetic" and meta.raw["source"]["seed"] == 1


def test_prepare_tiny(tmp_path):
    meta = assert_consistent_cache(prepare_data.prepare_tiny(tmp_path / "tiny"))
    assert meta.raw["splits"] == {"train": 4000, "validation": 500, "test": 500}
    assert meta.max_length == 128 and meta.raw["tokenizer"]["name"] == "bpe:8000"
    assert 2500 < meta.num_labels <= 4271


def test_folder_without_test_split_takes_half_of_validation(tmp_path):
    source = small_archive(tmp_path / "src", n_validation=11)
    (source / "test.jsonl").unlink()
    meta = data.read_meta(prepare(str(source), tmp_path / "cache", tokenizer=SMALL_BPE, max_length=64))
    assert meta.raw["splits"] == {"train": 40, "validation": 6, "test": 5}
    assert "5 of its 11 validation documents" in meta.raw["source"]["notes"][0]


def fake_hub(monkeypatch, columns: dict[str, list]) -> list[tuple]:
    """Replace datasets.load_dataset by an in-memory DatasetDict with the given columns in every split."""
    import datasets

    calls = []

    def load_dataset(repo_id, revision=None):
        calls.append((repo_id, revision))
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(columns) for s in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_source_maps_columns(tmp_path, monkeypatch):
    columns = {"celex_id": ["31990R0001", "31990R0002"], "title": ["Regulation on fish", "Decision on milk"],
               "text": ["Article text about fishing quotas.", "Article text about dairy."], "labels": [[1, 7], [3]]}
    calls = fake_hub(monkeypatch, columns)
    cache = prepare("someone/eurlex57k@v1.0", tmp_path / "hub", tokenizer=SMALL_BPE, max_length=64)
    assert calls == [("someone/eurlex57k", "v1.0")]
    meta = assert_consistent_cache(cache)
    assert json.loads((cache / "labels.json").read_text()) == ["1", "3", "7"]
    assert meta.raw["source"]["columns"] == {"celex_id": "celex_id", "eurovoc_concepts": "labels", "title": "title",
                                             "main_body": "text"}
    assert "no header, recitals" in meta.raw["source"]["notes"][0]
    tokenizer = AutoTokenizer.from_pretrained(cache / "tokenizer")
    expected = tokenizer("Regulation on fish\nArticle text about fishing quotas.")["input_ids"]
    assert data.TokenizedSplit(cache, "test").tokens(0).tolist() == expected


def test_hub_source_without_labels_fails_clearly(tmp_path, monkeypatch):
    fake_hub(monkeypatch, {"title": ["a"], "text": ["b"]})
    with pytest.raises(PrepareError, match="no label column .* it has title, text"):
        prepare("someone/eurlex57k", tmp_path / "hub", tokenizer=SMALL_BPE)
    assert_no_cache(tmp_path / "hub")


# --------------------------------------------------------------------------------------------------- bad input


def corrupt_truncated_line(source: Path) -> None:
    with open(source / "train.jsonl", "a") as f:
        f.write('{"celex_id": "32014R07')


def corrupt_non_json_line(source: Path) -> None:
    lines = (source / "dev.jsonl").read_text().splitlines(keepends=True)
    lines[2] = "this is not json\n"
    (source / "dev.jsonl").write_text("".join(lines))


def corrupt_missing_field(source: Path) -> None:
    records = read_records(source / "test.jsonl")
    del records[4]["recitals"]
    write_records(source / "test.jsonl", records)


def corrupt_empty_split(source: Path) -> None:
    (source / "dev.jsonl").write_text("")


def corrupt_label_list(source: Path) -> None:
    records = read_records(source / "train.jsonl")
    records[1]["eurovoc_concepts"] = "1091,3842"
    write_records(source / "train.jsonl", records)


@pytest.mark.parametrize("corrupt, message", [
    (corrupt_truncated_line, r"train\.jsonl:41: not valid JSON .*truncated"),
    (corrupt_non_json_line, r"dev\.jsonl:3: not valid JSON"),
    (corrupt_missing_field, r"test\.jsonl:5: record \d+\w\d+ has no field 'recitals'"),
    (corrupt_empty_split, r"the validation split has no documents"),
    (corrupt_label_list, r"train\.jsonl:2: eurovoc_concepts of record .* must be a list of concept ids, got str"),
])
@pytest.mark.parametrize("form", ["folder", "zip"])
def test_bad_records_fail_with_location_and_leave_no_cache(tmp_path, corrupt, message, form):
    source = small_archive(tmp_path / "src")
    corrupt(source)
    if form == "zip":
        source = zip_folder(source, tmp_path / "dataset.zip")
    out = tmp_path / "out" / "cache"
    with pytest.raises(PrepareError, match=message):
        prepare(str(source), out, tokenizer=SMALL_BPE, max_length=64)
    assert_no_cache(out)


@pytest.mark.parametrize("bad_entry", ["../evil.jsonl", "/tmp/evil.jsonl", "dataset/..\\..\\evil.jsonl", "C:/evil"])
def test_zip_with_unsafe_entry_is_refused_before_any_write(tmp_path, bad_entry):
    source = small_archive(tmp_path / "src")
    zip_path = zip_folder(source, tmp_path / "dataset.zip")
    with zipfile.ZipFile(zip_path, "a") as archive:
        archive.writestr(bad_entry, "{}\n")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(PrepareError, match="refusing unsafe entry"):
        prepare(str(zip_path), tmp_path / "out" / "cache", tokenizer=SMALL_BPE)
    assert sorted(tmp_path.rglob("*")) == before


def test_cli_reports_one_error_line_and_exits_2(tmp_path, capsys):
    source = small_archive(tmp_path / "src")
    corrupt_label_list(source)
    code = prepare_data.main(["--source", str(source), "--output_dir", str(tmp_path / "cache"),
                              "--tokenizer", SMALL_BPE])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "train.jsonl:2" in err[0]
    assert prepare_data.main(["--source", "./missing-folder", "--output_dir", str(tmp_path / "cache"),
                              "--tokenizer", SMALL_BPE]) == 2
    assert "is not an existing path" in capsys.readouterr().err
    # The default tokenizer is roberta-base from the hub: offline, the error says what to pass instead.
    assert prepare_data.main(["--source", str(source), "--output_dir", str(tmp_path / "cache"),
                              "--tokenizer", "dtype-bench-tests/no-such-tokenizer"]) == 2
    assert "pass a local tokenizer directory or bpe:SIZE" in capsys.readouterr().err


def test_cli_runs_as_a_script_from_the_repo_root(tmp_path):
    out = tmp_path / "cache"
    command = [sys.executable, "experiments/classification/prepare_data.py", "--source", "synthetic",
               "--synthetic_docs", "60", "--synthetic_labels", "20", "--tokenizer", "bpe:400", "--max_length", "48",
               "--output_dir", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "prepared" in done.stdout and data.read_meta(out).raw["splits"]["train"] == 48


# ---------------------------------------------------------------------------------------------------- download


@pytest.fixture
def archive_server(monkeypatch):
    """An HTTP server on 127.0.0.1 serving state["payload"] with its Content-Length, recording each request's
    Range header (None: the whole file) in state["ranges"]; when state["drop_after"] is set, the next response
    sends that many bytes and then drops the connection; state["status"] answers every request with that HTTP
    status; state["stall_s"] waits that long before answering."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    state: dict = {"payload": b"", "drop_after": None, "ranges": [], "status": 200, "stall_s": 0.0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["ranges"].append(self.headers.get("Range"))
            time.sleep(state["stall_s"])
            self.send_response(state["status"])
            self.send_header("Content-Length", str(len(state["payload"])))
            self.end_headers()
            drop_after, state["drop_after"] = state["drop_after"], None
            self.wfile.write(state["payload"] if drop_after is None else state["payload"][:drop_after])
            self.close_connection = True

        def log_message(self, *args) -> None:  # keep test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", state
    server.shutdown()
    server.server_close()


def error_lines(err: str) -> list[str]:
    """The `error: ...` lines of prepare_data.py's stderr (the plain-http warning and progress bars aside)."""
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_an_interrupted_download_leaves_nothing_and_the_next_run_downloads_it_whole(tmp_path, archive_server,
                                                                                    capsys):
    base_url, state = archive_server
    zip_path = zip_folder(small_archive(tmp_path / "src"), tmp_path / "dataset.zip")
    state["payload"] = zip_path.read_bytes()
    state["drop_after"] = len(state["payload"]) // 3
    out, downloads = tmp_path / "out" / "cache", tmp_path / "downloads"
    args = ["--source", f"{base_url}/dataset.zip", "--output_dir", str(out), "--tokenizer", SMALL_BPE,
            "--max_length", "64", "--download_dir", str(downloads)]

    assert prepare_main(args) == 2
    (error,) = error_lines(capsys.readouterr().err)
    assert f"broke off (IncompleteRead(" in error and "nothing was kept: run again" in error, error
    assert_no_cache(out)
    assert [p.name for p in downloads.iterdir()] == [DOWNLOADS_MARKER]  # no partial file

    assert prepare_main(args) == 0
    assert state["ranges"] == [None, None]  # pooch does not resume: the second request asks for the whole file
    digest = sha256_file(zip_path)
    assert f"SHA-256 {digest} (pass --sha256 {digest} to verify it next time)" in capsys.readouterr().out
    meta = assert_consistent_cache(out)
    assert meta.raw["source"]["sha256"] == digest
    assert meta.raw["source"]["url"] == f"{base_url}/dataset.zip"
    (stored,) = downloads.glob("*.zip")
    assert stat.S_IMODE(stored.stat().st_mode) == stat.S_IMODE((downloads / DOWNLOADS_MARKER).stat().st_mode)

    # The completed download is kept: preparing again reuses it and the cache without another request.
    prepare(f"{base_url}/dataset.zip", out, tokenizer=SMALL_BPE, max_length=64, download_dir=downloads)
    assert len(state["ranges"]) == 2


def test_a_downloads_folder_that_is_not_ours_is_never_written_into(tmp_path, archive_server, capsys):
    """The default download folder (beside the cache) holds a user's file: one line, exit 2, no request made."""
    base_url, state = archive_server
    state["payload"] = zip_folder(small_archive(tmp_path / "src"), tmp_path / "dataset.zip").read_bytes()
    (tmp_path / "out" / "downloads").mkdir(parents=True)
    (tmp_path / "out" / "downloads" / "mine.zip").write_bytes(b"a user's file")
    assert prepare_main(["--source", f"{base_url}/dataset.zip", "--output_dir", str(tmp_path / "out" / "cache"),
                         "--tokenizer", SMALL_BPE]) == 2
    assert "holds no .dtype-bench-downloads.json of ours" in capsys.readouterr().err
    assert state["ranges"] == [] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["downloads"]
    assert [p.name for p in (tmp_path / "out" / "downloads").iterdir()] == ["mine.zip"]


def test_unreachable_urls_and_http_errors_are_one_line_and_exit_2(tmp_path, archive_server, capsys, monkeypatch):
    base_url, state = archive_server
    downloads = tmp_path / "downloads"

    def fails(url: str) -> str:
        code = prepare_main(["--source", url, "--output_dir", str(tmp_path / "cache"), "--tokenizer", SMALL_BPE,
                             "--download_dir", str(downloads)])
        (error,) = error_lines(capsys.readouterr().err)
        assert code == 2 and [p.name for p in downloads.iterdir()] == [DOWNLOADS_MARKER], error
        assert_no_cache(tmp_path / "cache")
        return error

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    assert fails(f"http://127.0.0.1:{closed_port}/dataset.zip") == \
        f"error: cannot download http://127.0.0.1:{closed_port}/dataset.zip: Connection refused"
    state["status"] = 404
    assert fails(f"{base_url}/missing.zip") == f"error: cannot download {base_url}/missing.zip: HTTP 404 Not Found"
    state["status"], state["stall_s"] = 200, 2.0
    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT_S", 0.5)
    assert fails(f"{base_url}/slow.zip") == f"error: cannot download {base_url}/slow.zip: no answer within 0.5 s"


def test_a_download_past_max_file_bytes_is_stopped_and_deleted(tmp_path, archive_server, capsys):
    base_url, state = archive_server
    state["payload"] = os.urandom(3 * sources.DOWNLOAD_CHUNK_BYTES)
    downloads = tmp_path / "downloads"
    assert prepare_main(["--source", f"{base_url}/dataset.zip", "--output_dir", str(tmp_path / "cache"),
                         "--tokenizer", SMALL_BPE, "--download_dir", str(downloads),
                         "--max_file_bytes", str(sources.DOWNLOAD_CHUNK_BYTES)]) == 2
    (error,) = error_lines(capsys.readouterr().err)
    assert f"is larger than {sources.DOWNLOAD_CHUNK_BYTES:,} bytes; stopped and deleted" in error
    assert [p.name for p in downloads.iterdir()] == [DOWNLOADS_MARKER]


def test_a_response_that_is_not_a_zip_archive_is_deleted_and_not_recorded(tmp_path, archive_server, capsys):
    base_url, state = archive_server
    state["payload"] = b"<html>a login page</html>"
    downloads = tmp_path / "downloads"
    args = ["--source", f"{base_url}/dataset.zip", "--output_dir", str(tmp_path / "cache"), "--tokenizer", SMALL_BPE,
            "--download_dir", str(downloads)]
    assert prepare_main(args) == 2
    (error,) = error_lines(capsys.readouterr().err)
    assert error.endswith("did not return a zip archive (25 bytes, deleted): expected the EURLEX57K dataset.zip")
    assert [p.name for p in downloads.iterdir()] == [DOWNLOADS_MARKER]
    state["payload"] = zip_folder(small_archive(tmp_path / "src"), tmp_path / "dataset.zip").read_bytes()
    assert prepare_main([*args, "--max_length", "64"]) == 0  # nothing recorded pins the wrong file


def test_a_full_disk_while_downloading_is_one_line_and_leaves_no_partial_file(small_disk, tmp_path, archive_server,
                                                                             capsys):
    base_url, state = archive_server
    state["payload"] = os.urandom(256 << 10)  # four times the disk
    downloads = small_disk / "downloads"
    assert prepare_main(["--source", f"{base_url}/dataset.zip", "--output_dir", str(tmp_path / "cache"),
                         "--tokenizer", SMALL_BPE, "--download_dir", str(downloads)]) == 2
    (error,) = error_lines(capsys.readouterr().err)
    assert "No space left on device" in error and "nothing was kept" in error, error
    assert [p.name for p in downloads.iterdir()] == [DOWNLOADS_MARKER]


def prepared_by_url(tmp_path: Path, archive_server) -> tuple[str, Path, Path, Path, Path]:
    """A small archive served and prepared by URL: the URL, the archive, the cache, the downloads folder and
    the download stored there."""
    base_url, state = archive_server
    zip_path = zip_folder(small_archive(tmp_path / "src"), tmp_path / "dataset.zip")
    state["payload"] = zip_path.read_bytes()
    out, downloads = tmp_path / "out" / "cache", tmp_path / "downloads"
    url = f"{base_url}/dataset.zip"
    prepare(url, out, tokenizer=SMALL_BPE, max_length=64, download_dir=downloads)
    (stored,) = downloads.glob("*.zip")
    return url, zip_path, out, downloads, stored


def test_a_link_in_the_downloads_folder_is_replaced_never_written_through(tmp_path, archive_server):
    url, zip_path, out, downloads, stored = prepared_by_url(tmp_path, archive_server)
    state = archive_server[1]
    users_file = tmp_path / "users-file.zip"
    users_file.write_bytes(b"a user's file")
    stored.unlink()
    stored.symlink_to(users_file)
    prepare(url, out, tokenizer=SMALL_BPE, max_length=64, download_dir=downloads)
    assert len(state["ranges"]) == 2 and users_file.read_bytes() == b"a user's file"
    assert not stored.is_symlink() and sha256_file(stored) == sha256_file(zip_path)


# ------------------------------------------------------------------------------ folders that are not ours


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders); symlinks as their target."""
    return {str(p.relative_to(root)): (str(p.readlink()) if p.is_symlink() else p.read_bytes() if p.is_file()
                                       else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("occupant", ["user_folder", "file", "source_itself", "current_folder", "under_a_file"])
def test_prepare_refuses_an_output_dir_that_is_not_ours_before_any_work(tmp_path, monkeypatch, capsys, occupant):
    """`prepare` refuses an --output_dir that is not an absent, empty or own cache folder, and leaves it as it was."""
    source = small_archive(tmp_path / "src")
    if occupant == "user_folder":
        out = tmp_path / "precious"
        (out / "sub").mkdir(parents=True)
        (out / "thesis.txt").write_text("thesis")
    elif occupant == "file":
        out = tmp_path / "thesis.txt"
        out.write_text("thesis")
    elif occupant == "source_itself":
        out = source
    elif occupant == "current_folder":
        monkeypatch.chdir(source)
        out = Path(".")
    else:
        (tmp_path / "notes.txt").write_text("notes")
        out = tmp_path / "notes.txt" / "cache"
    before = snapshot(tmp_path)
    code = prepare_data.main(["--source", str(source), "--output_dir", str(out), "--tokenizer", SMALL_BPE])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert snapshot(tmp_path) == before


def test_symlinked_cache_folder_keeps_its_link_and_leaves_nothing_behind(tmp_path):
    source = small_archive(tmp_path / "src")
    target = tmp_path / "disk" / "cache"
    target.mkdir(parents=True)
    link = tmp_path / "cache"
    link.symlink_to(target)
    for force in (False, True):  # into the empty target, then replacing our own cache there
        prepare(str(source), link, tokenizer=SMALL_BPE, max_length=64, force=force)
        assert link.is_symlink() and link.resolve() == target.resolve()
        assert_consistent_cache(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "disk", "src"]
    assert sorted(p.name for p in target.parent.iterdir()) == [".cache.lock", "cache"]  # no .old-PID, no .tmp-


def test_garbled_meta_json_is_refused_in_one_line(tmp_path):
    source = small_archive(tmp_path / "src")
    out = prepare(str(source), tmp_path / "cache", tokenizer=SMALL_BPE, max_length=64)
    (out / "meta.json").write_text('{"format_version": 2, "fingerp')
    with pytest.raises(data.CacheError, match="unreadable meta.json"):
        data.read_meta(out)
    before = snapshot(out)
    with pytest.raises(FolderRefused, match="meta.json is unreadable"):
        prepare(str(source), out, tokenizer=SMALL_BPE, max_length=64)
    assert snapshot(out) == before


def test_damaged_cache_is_refused_by_readers_and_rebuilt_by_prepare(tmp_path, capsys):
    """A damaged cache file (emptied, or one byte changed) is refused by the reader and rebuilt by prepare."""
    source = small_archive(tmp_path / "src")
    out = prepare(str(source), tmp_path / "cache", tokenizer=SMALL_BPE, max_length=64)
    good = (out / "train.input_ids.npy").read_bytes()
    (out / "train.input_ids.npy").write_bytes(b"")
    with pytest.raises(data.CacheError, match=r"damaged: train\.input_ids\.npy \(0 bytes"):
        data.read_meta(out)
    capsys.readouterr()
    prepare(str(source), out, tokenizer=SMALL_BPE, max_length=64)
    assert "damaged" in capsys.readouterr().out and (out / "train.input_ids.npy").read_bytes() == good
    # Same size, one byte changed: only the recorded SHA-256 tells; a reader (run.py) refuses it, even after this
    # process verified the intact cache, and prepare rebuilds it.
    data.read_meta(out)
    flipped = bytearray(good)
    flipped[-1] ^= 1
    (out / "train.input_ids.npy").write_bytes(bytes(flipped))
    with pytest.raises(data.CacheError, match=r"damaged: train\.input_ids\.npy \(SHA-256 differs"):
        data.read_meta(out)
    prepare(str(source), out, tokenizer=SMALL_BPE, max_length=64)
    assert "SHA-256 differs" in capsys.readouterr().out and (out / "train.input_ids.npy").read_bytes() == good


# -------------------------------------------------------------------------------------------- bounded inputs


def zip_with_one_long_line(folder: Path, zip_path: Path, line_bytes: int) -> Path:
    """The archive of `folder` with a train.jsonl whose first line is `line_bytes` long (it compresses to
    almost nothing), written in chunks so that the test itself never holds it."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.glob("*.jsonl")):
            if path.name != "train.jsonl":
                archive.write(path, "dataset/" + path.name)
        with archive.open("dataset/train.jsonl", "w") as member:
            member.write(b'{"celex_id": "1", "title": "')
            for _ in range(line_bytes >> 20):
                member.write(b"a" * (1 << 20))
            member.write(b'"}\n' + (folder / "train.jsonl").read_bytes())
    return zip_path


@pytest.mark.parametrize("flags, needle", [
    ([], r"decompresses \d[\d,]* times its compressed size, more than 100 \(--max_compression_ratio"),
    (["--max_compression_ratio", "1e6", "--max_file_bytes", str(8 << 20)],
     r"decompresses to \d[\d,]* bytes, more than 8,388,608 \(--max_file_bytes"),
    (["--max_compression_ratio", "1e6", "--max_line_bytes", str(1 << 20)],
     r"train\.jsonl:1: a line longer than 1,048,576 bytes \(--max_line_bytes"),
])
def test_zip_member_past_a_limit_is_one_line_with_bounded_memory(tmp_path, capsys, flags, needle):
    """A 48 MiB line in a 50 kB zip: each limit stops it with one line naming the member and the flag, and the
    memory Python allocates stays a few MiB whatever the member's size."""
    import tracemalloc

    archive = zip_with_one_long_line(small_archive(tmp_path / "src"), tmp_path / "dataset.zip", 48 << 20)
    assert archive.stat().st_size < 1 << 20
    tracemalloc.start()
    code = prepare_data.main(["--source", str(archive), "--output_dir", str(tmp_path / "cache"),
                              "--tokenizer", SMALL_BPE, *flags])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(needle, err[0]) and "dataset/train.jsonl" in err[0], err
    assert peak < 8 << 20, f"peak {peak:,} bytes"
    assert_no_cache(tmp_path / "cache")


def test_download_is_verified_stored_with_its_checksum_and_reused_only_while_it_matches(tmp_path, archive_server,
                                                                                        capsys):
    base_url, state = archive_server
    zip_path = zip_folder(small_archive(tmp_path / "src"), tmp_path / "dataset.zip")
    state["payload"] = zip_path.read_bytes()
    digest = sha256_file(zip_path)
    out, downloads = tmp_path / "out" / "cache", tmp_path / "downloads"
    url = f"{base_url}/dataset.zip"

    with pytest.raises(PrepareError, match=f"has SHA-256 {digest}, not the {'0' * 64} given with --sha256"):
        prepare(url, out, tokenizer=SMALL_BPE, max_length=64, download_dir=downloads, sha256="0" * 64)
    assert [p.name for p in downloads.iterdir()] == [DOWNLOADS_MARKER]  # the wrong file is not kept
    assert "plain http" in capsys.readouterr().err

    prepare(url, out, tokenizer=SMALL_BPE, max_length=64, download_dir=downloads, sha256=digest)
    (stored,) = downloads.glob("*.zip")
    assert (downloads / f"{stored.name}.sha256").read_text().strip() == digest
    assert len(state["ranges"]) == 2
    capsys.readouterr()
    prepare(url, out, tokenizer=SMALL_BPE, max_length=64, download_dir=downloads)
    assert len(state["ranges"]) == 2 and "reusing download" in capsys.readouterr().out

    stored.write_bytes(stored.read_bytes() + b"\0")  # damaged on disk: downloaded again
    prepare(url, out, tokenizer=SMALL_BPE, max_length=64, download_dir=downloads)
    assert len(state["ranges"]) == 3 and "does not match its recorded SHA-256" in capsys.readouterr().out
    assert sha256_file(stored) == digest

    (downloads / f"{stored.name}.sha256").unlink()  # a file without its record is not known to be whole
    prepare(url, out, tokenizer=SMALL_BPE, max_length=64, download_dir=downloads)
    assert len(state["ranges"]) == 4 and "has no recorded SHA-256: downloading again" in capsys.readouterr().out


def test_a_file_that_changed_at_its_url_is_refused_until_its_new_checksum_is_given(tmp_path, archive_server):
    url, first, out, downloads, stored = prepared_by_url(tmp_path, archive_server)
    state = archive_server[1]
    stored.unlink()
    changed = zip_folder(small_archive(tmp_path / "src2", n_train=41), tmp_path / "changed.zip")
    state["payload"] = changed.read_bytes()
    new_digest = sha256_file(changed)
    with pytest.raises(PrepareError, match=f"has SHA-256 {new_digest}, not the {sha256_file(first)} recorded in .* "
                                           f"the file at that URL changed \\(pass --sha256 {new_digest} to accept"):
        prepare(url, out, tokenizer=SMALL_BPE, max_length=64, download_dir=downloads)
    assert not stored.exists()
    prepare(url, out, tokenizer=SMALL_BPE, max_length=64, download_dir=downloads, sha256=new_digest)
    assert data.read_meta(out).raw["source"]["sha256"] == new_digest
    assert (downloads / f"{stored.name}.sha256").read_text().strip() == new_digest


# ------------------------------------------------------------------------------ corpora refused or warned about


def no_labels(source: Path) -> None:
    write_records(source / "train.jsonl", [{**r, "eurovoc_concepts": []} for r in read_records(source / "train.jsonl")])


def empty_texts(source: Path) -> None:
    write_records(source / "dev.jsonl", [{**r, "title": "", "header": "", "recitals": "", "main_body": []}
                                         for r in read_records(source / "dev.jsonl")])


@pytest.mark.parametrize("corrupt, flags, message", [
    (no_labels, [], "no training document has a label"),
    (empty_texts, [], "every document of the validation split has empty text"),
    (None, ["--source", "synthetic", "--synthetic_labels", "0"], "synthetic_labels must be at least 1"),
    (None, ["--max_line_bytes", "0"], "--max_line_bytes must be positive"),
])
def test_corpora_that_cannot_train_or_be_evaluated_are_refused_in_one_line(tmp_path, capsys, corrupt, flags, message):
    source = small_archive(tmp_path / "src")
    if corrupt:
        corrupt(source)
    code = prepare_data.main(["--source", str(source), "--output_dir", str(tmp_path / "out" / "cache"),
                              "--tokenizer", SMALL_BPE, *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert_no_cache(tmp_path / "out" / "cache")


def test_documents_shared_by_train_and_evaluation_splits_are_warned_about_and_recorded(tmp_path, capsys):
    source = small_archive(tmp_path / "src")
    train = read_records(source / "train.jsonl")
    write_records(source / "test.jsonl", read_records(source / "test.jsonl") + train[:3])
    capsys.readouterr()
    meta = data.read_meta(prepare(str(source), tmp_path / "cache", tokenizer=SMALL_BPE, max_length=64))
    warning = "3 of 13 test documents are also in train"
    assert warning in capsys.readouterr().out
    assert any(warning in note for note in meta.raw["source"]["notes"])


def test_a_run_keeps_the_splits_it_opened_when_the_cache_is_rebuilt(tmp_path):
    """A cache rebuilt with --force while a run opens it: the run opens every split up front and checks the
    fingerprint after, so it never reports on data its row does not name."""
    source = small_archive(tmp_path / "src")
    out = prepare(str(source), tmp_path / "cache", tokenizer=SMALL_BPE, max_length=64)
    meta = data.read_meta(out)
    splits = data.open_splits(meta)
    opened = {split: np.array(part.input_ids) for split, part in splits.items()}
    prepare(str(source), out, tokenizer=SMALL_BPE, max_length=32)  # another run rebuilds it differently
    assert not np.array_equal(np.asarray(data.TokenizedSplit(out, "test").input_ids), opened["test"])
    assert all(np.array_equal(np.asarray(part.input_ids), opened[split]) for split, part in splits.items())
    with pytest.raises(data.CacheError, match="rebuilt while this run was opening it"):
        data.open_splits(meta)


def _prepare_small(source: Path, output_dir: Path, force: bool) -> None:
    prepare(str(source), output_dir, tokenizer=SMALL_BPE, max_length=64, force=force)


def test_leftovers_of_interrupted_cache_writes_are_cleaned_and_reported(tmp_path, capsys):
    """A build killed before its rename leaves `.cache.tmp-*`, and one killed between the swap's renames also
    `.cache.old-PID`: the next prepare of that cache restores or removes them and says so. Another cache's
    leftovers, and a user's folders that only look like leftovers, are left as they were."""
    source = small_archive(tmp_path / "src")
    out = prepare(str(source), tmp_path / "cache", tokenizer=SMALL_BPE, max_length=64)
    killed_at_rename(_prepare_small, (source, out, True), r"\.tmp-")
    killed_at_rename(_prepare_small, (source, tmp_path / "other", False), r"^\.other\.tmp-")
    assert not (tmp_path / "cache").exists() and len(list(tmp_path.glob(".cache.old-*"))) == 1
    for users in (".cache.old-mybackup", ".cache.tmp-notes"):
        (tmp_path / users).mkdir()
        (tmp_path / users / "mine.txt").write_bytes(b"\1" * 2048)
    capsys.readouterr()
    prepare(str(source), out, tokenizer=SMALL_BPE, max_length=64)
    printed = capsys.readouterr().out
    assert "reusing cache" in printed and printed.count("restored") == 1, printed
    assert printed.count("left by an interrupted write") == 1, printed  # the killed build's .tmp-
    assert ".cache.old-mybackup" not in printed and ".cache.tmp-notes" not in printed
    others = sorted(p.name for p in tmp_path.glob(".other.tmp-*"))
    assert len(others) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".cache.lock", ".cache.old-mybackup", ".cache.tmp-notes", *others, ".other.lock", "cache", "src"])
    for users in (".cache.old-mybackup", ".cache.tmp-notes"):
        assert (tmp_path / users / "mine.txt").read_bytes() == b"\1" * 2048