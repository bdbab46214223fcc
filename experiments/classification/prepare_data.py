"""Prepare the EUR-Lex cache that data.py reads: read the corpus, tokenize it once, write arrays and statistics.

    python experiments/classification/prepare_data.py --source SOURCE --output_dir DIR [--tokenizer T]
        [--max_length 512] [--zones title,header,recitals,main_body] [--download_dir DIR] [--force]
        [--synthetic_docs 5000 --synthetic_labels 4271 --synthetic_seed 0]

SOURCE is one of
  * the EURLEX57K archive: its `dataset.zip` (train.jsonl, dev.jsonl, test.jsonl, possibly inside a folder),
    as a local path, an http(s) URL (downloaded resumably into --download_dir), or an extracted folder;
  * any folder of jsonl files in the archive's schema (see dtype_bench.synthetic.ARCHIVE_FIELDS);
  * a Hugging Face hub dataset id, `owner/name[@revision]`, loaded with `datasets.load_dataset`;
  * `synthetic`: a generated corpus (dtype_bench.synthetic), written as jsonl and read like the archive;
  * `synthetic-ids` / `synthetic-ids-eurlex-lengths`: uniformly random token ids at the vocabulary size of
    `--tokenizer words:SIZE` (e.g. words:50265, roberta-base's), every document filling 512 tokens / with the
    length distribution of real EURLEX57K documents (dtype_bench.synthetic.token_id_texts); for speed and
    memory at full size offline, nothing in them is learnable.
Our split names are train / validation / test; the archive's `dev` is our `validation`. When a source has
no test split (like the shared 200-document sample), half of the validation documents, chosen with a fixed
seed, become the test split; the note is printed and recorded in meta.json.

The cache (format in data.py) is written atomically and fingerprinted over the source content, the
tokenizer and the options: preparing again with the same inputs reuses it, any change rebuilds it.
Bad input stops with one `error: ...` line (exit status 2) and leaves no cache behind.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

import numpy as np
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from dtype_bench.experiments.classification.data import ARRAYS, CACHE_FORMAT_VERSION, SPLITS
from dtype_bench import synthetic
from dtype_bench.configs import field_docs
from dtype_bench.io import (
    CACHE_MARKER, FolderRefused, atomic_write_json, atomic_write_text, building_cache, claim_folder, fingerprint,
    sha256_file,
)
from dtype_bench.tokenization import (
    TokenizerError, bpe_identity, load_tokenizer, parse_bpe_spec, parse_words_spec, tokenizer_fingerprint,
    train_bpe_tokenizer,
)

ZONES = ("title", "header", "recitals", "main_body", "attachments")
DEFAULT_ZONES = ("title", "header", "recitals", "main_body")
LABELS_FIELD = "eurovoc_concepts"
ID_FIELD = "celex_id"
# EURLEX57K paper (Chalkidis et al., 2019): frequent labels occur in more than 50 training documents.
FREQUENT_MIN_TRAIN_DOCS = 51
# A source without a test split gives this share of its validation documents to test, drawn with this seed.
TEST_SHARE_OF_VALIDATION = 0.5
TEST_SPLIT_SEED = 0
ENCODE_BATCH_DOCS = 1024  # per call into the Rust tokenizer, which spreads each batch over all cores
DOWNLOAD_CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 60
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?(@[\w./-]+)?")
# Hub copies of EURLEX57K name columns differently; the first alias present is used.
HUB_COLUMN_ALIASES = {
    ID_FIELD: ("celex_id", "celex", "id"),
    LABELS_FIELD: ("eurovoc_concepts", "labels", "concepts", "eurovoc"),
    "title": ("title",),
    "header": ("header",),
    "recitals": ("recitals",),
    "main_body": ("main_body", "text", "body"),
    "attachments": ("attachments",),
}
HUB_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "dev", "val"), "test": ("test",)}


class PrepareError(RuntimeError):
    """The source cannot be turned into a cache; the message (one line) says where and why."""


@dataclass(frozen=True)
class InputLimits:
    """Bounds on what a source can make this process read, so that a zip bomb or a file without line ends
    stops with one line instead of exhausting memory. The defaults are far above EURLEX57K's (about 0.3 GB
    of jsonl; the shared sample's longest record is 22 kB and its text compresses about 4x); the flags of
    the same names raise them."""

    max_file_bytes: int = 16 << 30
    """Decompressed bytes of one file or zip member, and bytes of one download."""
    max_line_bytes: int = 64 << 20
    """Bytes of one jsonl line (one record); a longer line is never held in memory whole."""
    max_compression_ratio: float = 100.0
    """Decompressed / compressed bytes of one zip member (text compresses 3-10x; a bomb 1,000x)."""

    def __post_init__(self) -> None:
        for name in field_docs(InputLimits):
            if not getattr(self, name) > 0:
                raise PrepareError(f"--{name} must be positive, got {getattr(self, name)}")


READ_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Document:
    celex_id: str
    text: str  # the chosen zones joined in order
    concepts: tuple[str, ...]  # gold concept ids, duplicates removed, order kept


Splits = dict[str, list[Document]]


@dataclass
class Corpus:
    """A source resolved far enough to fingerprint it; `read` parses it into documents."""

    identity: dict  # the content's identity (hashes, hub id + revision, generator options): goes into the fingerprint
    description: dict  # provenance recorded in meta.json
    read: Callable[[tuple[str, ...]], Splits]
    notes: list[str] = field(default_factory=list)  # decisions taken while reading, printed and recorded


# ----------------------------------------------------------------------------------------- records


def document_from_record(record: object, where: str, zones: tuple[str, ...]) -> Document:
    """Check one archive-schema record and keep what the cache needs; `where` names it in errors."""
    if not isinstance(record, dict):
        raise PrepareError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in (ID_FIELD, LABELS_FIELD, *zones):
        if name not in record:
            raise PrepareError(f"{where}: record {record.get(ID_FIELD, '?')} has no field {name!r}")
    concepts = record[LABELS_FIELD]
    if not isinstance(concepts, list) or not all(isinstance(c, (str, int)) for c in concepts):
        raise PrepareError(
            f"{where}: {LABELS_FIELD} of record {record[ID_FIELD]} must be a list of concept ids, "
            f"got {type(concepts).__name__} {str(concepts)[:60]!r}"
        )
    parts = []
    for zone in zones:
        value = record[zone]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = "\n".join(value)  # main_body: one string per article
        if not isinstance(value, str):
            raise PrepareError(f"{where}: field {zone!r} of record {record[ID_FIELD]} is {type(value).__name__}, "
                               "expected text or a list of texts")
        if value:
            parts.append(value)
    return Document(str(record[ID_FIELD]), "\n".join(parts), tuple(dict.fromkeys(str(c) for c in concepts)))


def bounded_lines(stream: IO[bytes], name: str, limits: InputLimits, compressed_bytes: int | None = None
                  ) -> Iterator[bytes]:
    """The lines of `stream`, read in chunks so that memory stays within one line, refused (PrepareError
    naming the file and the limit) past `limits`; `compressed_bytes` (a zip member's) bounds the ratio."""
    total, lineno, pending = 0, 0, b""
    while chunk := stream.read(READ_CHUNK_BYTES):
        total += len(chunk)
        if total > limits.max_file_bytes:
            raise PrepareError(f"{name} decompresses to more than {limits.max_file_bytes:,} bytes "
                               "(--max_file_bytes raises the limit)")
        if compressed_bytes is not None and total > limits.max_compression_ratio * max(compressed_bytes, 1) \
                and total > READ_CHUNK_BYTES:
            raise PrepareError(f"{name} decompresses more than {limits.max_compression_ratio:g} times its "
                               f"{compressed_bytes:,} compressed bytes (--max_compression_ratio raises the limit)")
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete:
            lineno += 1
            check_line_length(line, f"{name}:{lineno}", limits)
            yield line
        check_line_length(pending, f"{name}:{lineno + 1}", limits)
    if pending:
        yield pending


def check_line_length(line: bytes, where: str, limits: InputLimits) -> None:
    if len(line) > limits.max_line_bytes:
        raise PrepareError(f"{where}: a line longer than {limits.max_line_bytes:,} bytes "
                           "(--max_line_bytes raises the limit)")


def parse_jsonl(lines: Iterable[bytes], name: str, zones: tuple[str, ...]) -> list[Document]:
    """Documents of one jsonl stream (a file or a zip member, hence not io.read_jsonl, which opens paths)."""
    documents = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{name}:{lineno}: not valid JSON ({e.msg}); is the file truncated?") from e
        except UnicodeDecodeError as e:
            raise PrepareError(f"{name}:{lineno}: not UTF-8 text ({e.reason})") from e
        documents.append(document_from_record(record, f"{name}:{lineno}", zones))
    return documents


def complete_splits(splits: Splits, location: str, notes: list[str]) -> Splits:
    """Check every split has documents, deriving test from validation when the source has none; refuse a
    corpus that cannot train a classifier and warn about one that cannot be evaluated honestly."""
    if "test" not in splits and "validation" in splits:
        validation = splits["validation"]
        order = np.random.default_rng(TEST_SPLIT_SEED).permutation(len(validation))
        is_test = np.zeros(len(validation), dtype=bool)
        is_test[order[: int(len(validation) * TEST_SHARE_OF_VALIDATION)]] = True
        splits["validation"] = [d for d, test in zip(validation, is_test) if not test]
        splits["test"] = [d for d, test in zip(validation, is_test) if test]
        note = (f"{location} has no test split: {len(splits['test'])} of its {len(validation)} validation documents "
                f"(seed {TEST_SPLIT_SEED}) became the test split")
        notes.append(note)
        print(f"note: {note}")
    for split in SPLITS:
        if split not in splits:
            raise PrepareError(f"{location} has no {split} split")
        if not splits[split]:
            raise PrepareError(f"{location}: the {split} split has no documents")
        empty = sum(not d.text.strip() for d in splits[split])
        if empty == len(splits[split]):
            raise PrepareError(f"{location}: every document of the {split} split has empty text in the chosen zones")
        if empty:
            warn(f"{location}: {empty} of {len(splits[split])} {split} documents have empty text", notes)
    if not any(d.concepts for d in splits["train"]):
        raise PrepareError(f"{location}: no training document has a label ({LABELS_FIELD} is empty in all "
                           f"{len(splits['train'])}): nothing to learn")
    train_ids, train_texts = {d.celex_id for d in splits["train"]}, {d.text for d in splits["train"]}
    for split in ("validation", "test"):
        shared = sum(d.celex_id in train_ids or d.text in train_texts for d in splits[split])
        if shared:
            warn(f"{location}: {shared} of {len(splits[split])} {split} documents are also in train (same "
                 f"{ID_FIELD} or same text): their scores measure memory, not generalisation", notes)
    return {split: splits[split] for split in SPLITS}


def warn(message: str, notes: list[str]) -> None:
    """Print a warning about the corpus and record it (meta.json keeps the notes)."""
    notes.append(message)
    print(f"warning: {message}")


# ------------------------------------------------------------------------------- archive (jsonl files)


@dataclass(frozen=True)
class SplitFile:
    name: str  # shown in errors: a path, or zip!member
    open: Callable[[], contextlib.AbstractContextManager[IO[bytes]]]
    compressed_bytes: int | None = None  # a zip member's, for the compression-ratio limit


def read_split_files(
    files: dict[str, SplitFile], location: str, notes: list[str], limits: InputLimits
) -> Callable[[tuple[str, ...]], Splits]:
    def read(zones: tuple[str, ...]) -> Splits:
        splits = {}
        for split, split_file in files.items():
            try:
                with split_file.open() as stream:
                    lines = bounded_lines(stream, split_file.name, limits, split_file.compressed_bytes)
                    splits[split] = parse_jsonl(lines, split_file.name, zones)
            except (zipfile.BadZipFile, OSError) as e:
                raise PrepareError(f"cannot read {split_file.name}: {e}") from e
        return complete_splits(splits, location, notes)

    return read


def folder_corpus(folder: Path, limits: InputLimits) -> Corpus:
    candidates = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]
    roots = [d for d in candidates if (d / synthetic.ARCHIVE_SPLIT_FILES["train"]).is_file()]
    if not roots:
        raise PrepareError(f"no {synthetic.ARCHIVE_SPLIT_FILES['train']} in {folder} or its subfolders")
    if roots[0] != folder and len(roots) > 1:
        raise PrepareError(f"{folder} has several subfolders with train.jsonl: {[str(r) for r in roots]}")
    root = roots[0]
    paths = {s: root / name for s, name in synthetic.ARCHIVE_SPLIT_FILES.items() if (root / name).is_file()}
    files = {s: SplitFile(str(p), lambda p=p: open(p, "rb")) for s, p in paths.items()}
    notes: list[str] = []
    return Corpus(
        identity={"kind": "archive_files", "sha256": {p.name: sha256_file(p) for p in paths.values()}},
        description={"kind": "folder", "location": str(root.resolve())},
        read=read_split_files(files, str(root.resolve()), notes, limits),
        notes=notes,
    )


def check_zip_names(zip_path: Path, names: list[str]) -> None:
    """Refuse archives whose entries would land outside an extraction folder (absolute paths, drive letters,
    `..`): such an archive is broken or hostile, even though we only read members and never extract."""
    for name in names:
        path = PureWindowsPath(name)  # splits on both / and \\, and knows drive letters
        if path.drive or path.root or ".." in path.parts:
            raise PrepareError(f"{zip_path}: refusing unsafe entry {name!r} (absolute path or '..')")


@contextlib.contextmanager
def open_zip_member(zip_path: Path, member: str) -> Iterator[IO[bytes]]:
    with zipfile.ZipFile(zip_path) as archive, archive.open(member) as stream:
        yield stream


def check_zip_sizes(zip_path: Path, member: zipfile.ZipInfo, limits: InputLimits) -> None:
    """The sizes a member declares, before reading it (zipfile never yields more than the declared size;
    bounded_lines counts what is read as well)."""
    where = f"{zip_path}!{member.filename}"
    if member.file_size > limits.max_file_bytes:
        raise PrepareError(f"{where} decompresses to {member.file_size:,} bytes, more than {limits.max_file_bytes:,} "
                           "(--max_file_bytes raises the limit)")
    if member.file_size > READ_CHUNK_BYTES and member.file_size > limits.max_compression_ratio * max(
            member.compress_size, 1):
        raise PrepareError(f"{where} decompresses {member.file_size / max(member.compress_size, 1):,.0f} times its "
                           f"compressed size, more than {limits.max_compression_ratio:g} "
                           "(--max_compression_ratio raises the limit)")


def zip_corpus(zip_path: Path, description: dict, limits: InputLimits, digest: str | None = None) -> Corpus:
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = archive.namelist()  # duplicates kept: an archive with two train.jsonl is refused below
            members = {info.filename: info for info in archive.infolist()}
    except zipfile.BadZipFile as e:
        raise PrepareError(f"{zip_path} is not a readable zip archive ({e})") from e
    check_zip_names(zip_path, names)
    files = {}
    for split, filename in synthetic.ARCHIVE_SPLIT_FILES.items():
        # macOS archivers add __MACOSX/._train.jsonl resource forks; those are not data.
        matches = [n for n in names if PurePosixPath(n).name == filename and not n.startswith("__MACOSX/")]
        if len(matches) > 1:
            raise PrepareError(f"{zip_path} holds several {filename}: {matches}")
        if matches:
            check_zip_sizes(zip_path, members[matches[0]], limits)
            files[split] = SplitFile(f"{zip_path}!{matches[0]}", lambda m=matches[0]: open_zip_member(zip_path, m),
                                     members[matches[0]].compress_size)
    if "train" not in files:
        raise PrepareError(f"{zip_path} holds no train.jsonl; expected the EURLEX57K dataset.zip")
    notes: list[str] = []
    digest = digest or sha256_file(zip_path)
    return Corpus(
        identity={"kind": "archive_zip", "sha256": digest},
        description={**description, "sha256": digest},
        read=read_split_files(files, str(zip_path), notes, limits),
        notes=notes,
    )


def local_corpus(path: Path, limits: InputLimits, sha256: str | None) -> Corpus:
    if path.is_dir():
        if sha256:
            raise PrepareError("--sha256 checks a zip archive or a download, not a folder")
        return folder_corpus(path, limits)
    if not zipfile.is_zipfile(path):
        raise PrepareError(f"{path} is neither a folder nor a zip archive: pass the EURLEX57K dataset.zip "
                           "or its folder")
    digest = sha256_file(path)
    if sha256 and digest != sha256:
        raise PrepareError(f"{path} has SHA-256 {digest}, not the {sha256} given with --sha256")
    return zip_corpus(path, {"kind": "zip", "location": str(path.resolve())}, limits, digest)


# ------------------------------------------------------------------------------------------ download


def download(url: str, dest: Path, max_bytes: int) -> Path:
    """Fetch `url` to `dest` through `dest.part`, resuming a previous partial download with an HTTP Range
    request. An interrupted transfer raises PrepareError and keeps the .part for the next attempt; a
    download past `max_bytes` is stopped and deleted."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    stopped = f"the partial file {part} is kept: run again to resume"
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
            if offset and response.status != 206:  # the server ignored the range: start over
                offset = 0
            total = None if response.length is None else offset + response.length
            with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=f"download {dest.name}"
            ) as progress:
                while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                    out.write(chunk)
                    progress.update(len(chunk))
                    if out.tell() > max_bytes:
                        break
                out.flush()
                os.fsync(out.fileno())
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the .part is already as long as the file (or longer): start over
            part.unlink()
            return download(url, dest, max_bytes)
        raise PrepareError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise PrepareError(f"cannot download {url}: {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:  # connection reset, timeout, short read
        raise PrepareError(f"download of {url} failed ({type(e).__name__}); {stopped}") from e
    size = part.stat().st_size
    if size > max_bytes:
        part.unlink()
        raise PrepareError(f"download of {url} is larger than {max_bytes:,} bytes; stopped and deleted "
                           "(--max_file_bytes raises the limit)")
    if total is not None and size != total:
        raise PrepareError(f"download of {url} stopped at {size} of {total} bytes; {stopped}")
    os.replace(part, dest)
    return dest


def url_corpus(url: str, download_dir: Path, limits: InputLimits, sha256: str | None) -> Corpus:
    """A downloaded archive, stored with its SHA-256 beside it (`<file>.sha256`) and reused only while the
    file still has it (and the one given with --sha256, if any)."""
    if url.startswith("http://"):
        print(f"warning: {url} is plain http, which anyone on the way can alter: prefer https"
              + ("" if sha256 else ", or pass --sha256 to verify the download"), file=sys.stderr)
    basename = PurePosixPath(urllib.parse.urlparse(url).path).name or "download"
    # The url's hash in the name keeps two sources with the same basename apart.
    dest = download_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{basename}"
    recorded = dest.with_name(dest.name + ".sha256")
    if dest.exists():
        digest = sha256_file(dest)
        expected = recorded.read_text().strip() if recorded.exists() else None
        if digest == expected and sha256 in (None, digest):
            print(f"reusing download {dest} (SHA-256 {digest})")
        else:
            print(f"note: the earlier download {dest} does not match its recorded SHA-256"
                  + (" or --sha256" if sha256 else "") + ": downloading again")
            dest.unlink()
    if not dest.exists():
        download(url, dest, limits.max_file_bytes)
        digest = sha256_file(dest)
        if sha256 and digest != sha256:
            dest.unlink()
            raise PrepareError(f"download of {url} has SHA-256 {digest}, not the {sha256} given with --sha256; "
                               "deleted it")
        atomic_write_text(recorded, digest + "\n")
    if not zipfile.is_zipfile(dest):
        raise PrepareError(f"{url} did not return a zip archive (saved as {dest}, delete it to download again); "
                           "expected the EURLEX57K dataset.zip")
    return zip_corpus(dest, {"kind": "url", "url": url, "location": str(dest.resolve())}, limits, digest)


# ----------------------------------------------------------------------------------------------- hub


def hub_corpus(source: str) -> Corpus:
    import datasets  # heavy (seconds) and only needed for hub sources

    repo_id, _, revision = source.partition("@")
    revision = revision or None
    try:
        loaded = datasets.load_dataset(repo_id, revision=revision)
    except Exception as e:  # datasets raises many types (offline, not found, bad format): one line for all
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PrepareError(f"{source!r} is not a local path, and loading it from the Hugging Face hub failed "
                           f"({type(e).__name__}: {first_line[:160]})") from e
    raw_splits = {}
    for split, aliases in HUB_SPLIT_ALIASES.items():
        name = next((a for a in aliases if a in loaded), None)
        if name is not None:
            raw_splits[split] = (name, loaded[name])
    if "train" not in raw_splits:
        raise PrepareError(f"hub dataset {source!r} has no train split (has {sorted(loaded)})")
    columns = raw_splits["train"][1].column_names
    column_of = {f: next((c for c in aliases if c in columns), None) for f, aliases in HUB_COLUMN_ALIASES.items()}
    if column_of[LABELS_FIELD] is None:
        raise PrepareError(f"hub dataset {source!r} has no label column (looked for "
                           f"{', '.join(HUB_COLUMN_ALIASES[LABELS_FIELD])}; it has {', '.join(columns)})")

    # Hash rows in order: the content identity of a hub revision (which may be a moving branch).
    digest = hashlib.sha256()
    records: dict[str, list[dict]] = {}
    for split, (name, rows) in raw_splits.items():
        records[split] = []
        for index, row in enumerate(rows):
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
            record = {f: row[c] for f, c in column_of.items() if c is not None}
            record.setdefault(ID_FIELD, f"{name}-{index}")
            records[split].append(record)
    notes: list[str] = []

    def read(zones: tuple[str, ...]) -> Splits:
        missing = [z for z in zones if column_of[z] is None]
        if len(missing) == len(zones):
            raise PrepareError(f"hub dataset {source!r} has none of the text zones {', '.join(zones)} "
                               f"(columns: {', '.join(columns)})")
        if missing:
            notes.append(f"hub dataset {source!r} has no {', '.join(missing)}: those zones are empty")
            print(f"note: {notes[-1]}")
        splits = {
            split: [document_from_record({**dict.fromkeys(missing, ""), **r}, f"{source}[{split}][{i}]", zones)
                    for i, r in enumerate(rows)]
            for split, rows in records.items()
        }
        return complete_splits(splits, source, notes)

    return Corpus(
        identity={"kind": "hub", "repo_id": repo_id, "revision": revision, "content_sha256": digest.hexdigest()},
        description={"kind": "hub", "repo_id": repo_id, "revision": revision,
                     "columns": {f: c for f, c in column_of.items() if c is not None}},
        read=read,
        notes=notes,
    )


# ----------------------------------------------------------------------------------------- synthetic


def synthetic_split_sizes(n_docs: int) -> dict[str, int]:
    """80/10/10, as EURLEX57K's 45k/6k/6k is roughly."""
    if n_docs < 10:
        raise PrepareError(f"synthetic_docs must be at least 10, got {n_docs}")
    held_out = n_docs // 10
    return {"train": n_docs - 2 * held_out, "validation": held_out, "test": held_out}


def synthetic_corpus(n_docs: int, num_labels: int, seed: int) -> Corpus:
    sizes = synthetic_split_sizes(n_docs)
    if num_labels < 1:
        raise PrepareError(f"synthetic_labels must be at least 1, got {num_labels}")
    options = {"docs": sizes, "num_labels": num_labels, "seed": seed}

    def read(zones: tuple[str, ...]) -> Splits:
        # Through the archive code path, so the synthetic corpus exercises exactly what real data does.
        with tempfile.TemporaryDirectory(prefix="synthetic-eurlex-") as folder:
            synthetic.write_jsonl_splits(folder, sizes["train"], sizes["validation"], sizes["test"], seed, num_labels)
            return folder_corpus(Path(folder), InputLimits()).read(zones)

    return Corpus(
        identity={"kind": "synthetic", **options, "generator_version": synthetic.GENERATOR_VERSION},
        description={"kind": "synthetic", **options},
        read=read,
    )


TOKEN_ID_SOURCES = {"synthetic-ids": "filling", "synthetic-ids-eurlex-lengths": "eurlex_sample"}
"""Source name -> length distribution of the token-id corpus (dtype_bench.synthetic.TOKEN_ID_LENGTHS)."""


def token_id_corpus(source: str, tokenizer: str, n_docs: int, num_labels: int, seed: int) -> Corpus:
    vocab_size = parse_words_spec(tokenizer)
    if vocab_size is None:
        raise PrepareError(f"source {source} is written for a words:SIZE tokenizer, got --tokenizer {tokenizer}")
    sizes = synthetic_split_sizes(n_docs)
    if sizes["train"] < num_labels:
        raise PrepareError(f"{source}: {sizes['train']} training documents cannot hold all {num_labels} labels; "
                           f"pass synthetic_docs >= {-(-num_labels * 10 // 8)}")
    options = {"docs": sizes, "num_labels": num_labels, "seed": seed, "vocab_size": vocab_size,
               "lengths": TOKEN_ID_SOURCES[source]}

    def read(zones: tuple[str, ...]) -> Splits:  # the text is all there is: it stands in for every zone
        texts = synthetic.token_id_texts(n_docs, vocab_size=vocab_size, lengths=options["lengths"],
                                         num_labels=num_labels, seed=seed)
        documents = [Document(f"synthetic-ids-{i}", text, tuple(labels)) for i, (text, labels) in enumerate(texts)]
        bounds = np.cumsum([0, *sizes.values()])
        return {split: documents[start:stop] for split, start, stop in zip(sizes, bounds, bounds[1:])}

    return Corpus(identity={"kind": source, **options, "generator_version": synthetic.GENERATOR_VERSION},
                  description={"kind": source, **options}, read=read)


def open_source(source: str, download_dir: Path, synthetic_docs: int, synthetic_labels: int,
                synthetic_seed: int, tokenizer: str, limits: InputLimits, sha256: str | None) -> Corpus:
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise PrepareError(f"--sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if source == "synthetic":
        return synthetic_corpus(synthetic_docs, synthetic_labels, synthetic_seed)
    if source in TOKEN_ID_SOURCES:
        return token_id_corpus(source, tokenizer, synthetic_docs, synthetic_labels, synthetic_seed)
    if re.match(r"https?://", source):
        return url_corpus(source, download_dir, limits, sha256)
    path = Path(source).expanduser()
    if path.exists():
        return local_corpus(path, limits, sha256)
    if HUB_ID.fullmatch(source) and not source.startswith("."):
        return hub_corpus(source)
    raise PrepareError(f"source {source!r} is not an existing path, an http(s) URL, a hub id or 'synthetic'")


# ------------------------------------------------------------------------------------------ encoding


@dataclass
class EncodedSplit:
    input_ids: np.ndarray  # int32, concatenated, truncated
    doc_offsets: np.ndarray  # int64, n_docs + 1
    full_lengths: np.ndarray  # int64, tokens per document before truncation (special tokens included)
    label_ids: np.ndarray  # int32, concatenated
    label_offsets: np.ndarray  # int64, n_docs + 1
    n_unseen_labels: np.ndarray  # int32, n_docs


def offsets_of(lengths: Iterable[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.fromiter(lengths, dtype=np.int64))]).astype(np.int64)


def encode_texts(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], max_length: int, desc: str
) -> tuple[list[np.ndarray], np.ndarray]:
    """Token ids truncated to max_length (keeping the closing special tokens, as the tokenizer's own
    truncation would), and each text's length before truncation for the statistics."""
    backend = tokenizer.backend_tokenizer
    probe = backend.encode("a").special_tokens_mask  # e.g. [1, 0, 1] for <s> a </s>
    text_positions = [i for i, special in enumerate(probe) if not special]
    n_closing = len(probe) - 1 - text_positions[-1]
    if max_length <= len(probe) - len(text_positions):
        raise PrepareError(f"max_length {max_length} leaves no room for text between the special tokens")
    full_lengths = np.empty(len(texts), dtype=np.int64)
    ids: list[np.ndarray] = []
    with tqdm(total=len(texts), unit="doc", desc=desc) as progress:
        for start in range(0, len(texts), ENCODE_BATCH_DOCS):
            # encode_batch_fast skips character offsets, which the cache does not need.
            batch = backend.encode_batch_fast(texts[start : start + ENCODE_BATCH_DOCS])
            for position, encoding in enumerate(batch, start):
                doc = encoding.ids
                full_lengths[position] = len(doc)
                if len(doc) > max_length:
                    doc = doc[: max_length - n_closing] + doc[len(doc) - n_closing :]
                ids.append(np.asarray(doc, dtype=np.int32))
            progress.update(len(batch))
    return ids, full_lengths


def encode_split(
    tokenizer: PreTrainedTokenizerFast, documents: list[Document], label_index: dict[str, int], max_length: int,
    split: str,
) -> EncodedSplit:
    ids, full_lengths = encode_texts(tokenizer, [d.text for d in documents], max_length, f"tokenize {split}")
    labels = [np.array([label_index[c] for c in d.concepts if c in label_index], dtype=np.int32) for d in documents]
    return EncodedSplit(
        input_ids=np.concatenate(ids),
        doc_offsets=offsets_of(len(d) for d in ids),
        full_lengths=full_lengths,
        label_ids=np.concatenate(labels),
        label_offsets=offsets_of(len(l) for l in labels),
        n_unseen_labels=np.array([len(d.concepts) - len(l) for d, l in zip(documents, labels)], dtype=np.int32),
    )


# ---------------------------------------------------------------------------------------- statistics


def label_group(train_docs: int) -> str:
    if train_docs >= FREQUENT_MIN_TRAIN_DOCS:
        return "frequent"
    return "few_shot" if train_docs > 0 else "zero_shot"


def compute_stats(splits: Splits, encoded: dict[str, EncodedSplit], num_labels: int, max_length: int) -> dict:
    train_docs_per_concept = Counter(c for d in splits["train"] for c in d.concepts)
    stats: dict = {"num_labels": num_labels, "max_length": max_length, "splits": {}}
    for split, documents in splits.items():
        labels_per_doc = np.array([len(d.concepts) for d in documents])
        lengths = encoded[split].full_lengths
        assignments = Counter(label_group(train_docs_per_concept[c]) for d in documents for c in d.concepts)
        distinct = {c for d in documents for c in d.concepts}
        distinct_by_group = Counter(label_group(train_docs_per_concept[c]) for c in distinct)
        p50, p90, p95, p99 = np.percentile(lengths, [50, 90, 95, 99])
        stats["splits"][split] = {
            "documents": len(documents),
            "distinct_labels": len(distinct),
            "labels_per_document": {"mean": float(labels_per_doc.mean()), "min": int(labels_per_doc.min()),
                                    "max": int(labels_per_doc.max())},
            "tokens_before_truncation": {"mean": float(lengths.mean()), "median": float(p50), "p90": float(p90),
                                         "p95": float(p95), "p99": float(p99), "max": int(lengths.max())},
            "fraction_truncated": float((lengths > max_length).mean()),
            "label_groups": {g: {"labels": distinct_by_group[g], "assignments": assignments[g]}
                             for g in ("frequent", "few_shot", "zero_shot")},
            "assignments_outside_label_space": int(encoded[split].n_unseen_labels.sum()),
        }
    return stats


def stats_markdown(stats: dict) -> str:
    splits = stats["splits"]
    header = "| | " + " | ".join(splits) + " |\n|---|" + "---:|" * len(splits) + "\n"

    def row(label: str, value: Callable[[dict], str]) -> str:
        return f"| {label} | " + " | ".join(value(s) for s in splits.values()) + " |\n"

    groups = {"frequent": "frequent", "few_shot": "few-shot", "zero_shot": "zero-shot"}
    return (
        f"Label space: {stats['num_labels']} concepts (those in train). Groups as in the EURLEX57K paper: frequent "
        f"= in more than {FREQUENT_MIN_TRAIN_DOCS - 1} training documents, few-shot = 1 to "
        f"{FREQUENT_MIN_TRAIN_DOCS - 1}, zero-shot = not in train. Tokens include <s> and </s>; "
        f"max_length {stats['max_length']}.\n\n" + header
        + row("documents", lambda s: f"{s['documents']}")
        + row("distinct labels", lambda s: f"{s['distinct_labels']}")
        + row("labels/doc mean (min-max)", lambda s: "{mean:.2f} ({min}-{max})".format(**s["labels_per_document"]))
        + "".join(row(f"tokens/doc {k}", lambda s, k=k: f"{s['tokens_before_truncation'][k]:.0f}")
                  for k in ("mean", "median", "p90", "p95", "p99", "max"))
        + row("truncated", lambda s: f"{s['fraction_truncated']:.1%}")
        + "".join(row(f"{name} labels / assignments", lambda s, g=g: "{labels} / {assignments}".format(
                      **s["label_groups"][g])) for g, name in groups.items())
    )


# ------------------------------------------------------------------------------------------- prepare


def prepare(
    source: str,
    output_dir: str | Path,
    *,
    tokenizer: str = "roberta-base",
    max_length: int = 512,
    zones: Iterable[str] = DEFAULT_ZONES,
    force: bool = False,
    download_dir: str | Path | None = None,
    synthetic_docs: int = 5000,
    synthetic_labels: int = synthetic.EURLEX_NUM_LABELS,
    synthetic_seed: int = 0,
    limits: InputLimits = InputLimits(),
    sha256: str | None = None,
) -> Path:
    """Build (or reuse) the cache for `source` in `output_dir` and return its path. `download_dir` holds
    downloads of URL sources (default: a `downloads` folder beside output_dir); the synthetic_* options
    apply to the `synthetic` source only; `sha256` is the expected SHA-256 of a zip or URL source."""
    output_dir = claim_folder(output_dir, CACHE_MARKER, "fingerprint")  # never replace what is not ours
    zones = tuple(zones)
    unknown = [z for z in zones if z not in ZONES]
    if not zones or unknown or len(set(zones)) != len(zones):
        raise PrepareError(f"zones must be distinct names from {', '.join(ZONES)}; got {', '.join(zones) or 'none'}")
    bpe_size = parse_bpe_spec(tokenizer)
    # A bpe tokenizer is a function of its training texts (the source) and size, so it is fingerprinted
    # before training; any other tokenizer is loaded and fingerprinted by content. Both before the source,
    # so a bad tokenizer spec fails before a long download.
    loaded_tokenizer = None if bpe_size is not None else load_tokenizer(tokenizer)
    corpus = open_source(source, Path(download_dir) if download_dir else output_dir.parent / "downloads",
                         synthetic_docs, synthetic_labels, synthetic_seed, tokenizer, limits, sha256)
    options = {"max_length": max_length, "zones": list(zones)}
    token_identity = bpe_identity(bpe_size) if loaded_tokenizer is None else tokenizer_fingerprint(loaded_tokenizer)
    # What determines the data, and nothing else: not this code's bytes, so that a comment edit does not
    # orphan the results made from a cache. A changed rule (say, the test split of a source without one)
    # bumps CACHE_FORMAT_VERSION.
    cache_fingerprint = fingerprint(CACHE_FORMAT_VERSION, corpus.identity, token_identity, options)

    with building_cache(output_dir, cache_fingerprint, CACHE_FORMAT_VERSION, force=force) as tmp:
        if tmp is None:
            return output_dir
        started = time.perf_counter()
        splits = corpus.read(zones)
        labels = sorted({c for d in splits["train"] for c in d.concepts})
        label_index = {c: i for i, c in enumerate(labels)}
        if loaded_tokenizer is None:
            print(f"training a byte-level BPE tokenizer ({bpe_size} tokens) on the train split")
            active_tokenizer = train_bpe_tokenizer((d.text for d in splits["train"]), bpe_size, tmp / "tokenizer")
        else:
            active_tokenizer = loaded_tokenizer
            active_tokenizer.save_pretrained(str(tmp / "tokenizer"))
        encoded = {split: encode_split(active_tokenizer, docs, label_index, max_length, split)
                   for split, docs in splits.items()}
        for split, arrays in encoded.items():
            for name in ARRAYS:
                np.save(tmp / f"{split}.{name}.npy", getattr(arrays, name))
        atomic_write_json(tmp / "labels.json", labels)
        stats = compute_stats(splits, encoded, len(labels), max_length)
        report = stats_markdown(stats)
        atomic_write_json(tmp / "stats.json", stats)
        atomic_write_text(tmp / "stats.md", report)
        seconds = time.perf_counter() - started
        n_docs = sum(len(d) for d in splits.values())
        atomic_write_json(tmp / "meta.json", {
            "format_version": CACHE_FORMAT_VERSION,
            "fingerprint": cache_fingerprint,
            "source": {**corpus.description, "notes": corpus.notes},
            "tokenizer": {
                "name": tokenizer,
                "fingerprint": tokenizer_fingerprint(active_tokenizer),
                "vocab_size": len(active_tokenizer),
                "pad_token_id": active_tokenizer.pad_token_id,
                "cls_token_id": active_tokenizer.cls_token_id,
                "sep_token_id": active_tokenizer.sep_token_id,
            },
            "options": options,
            "splits": {split: len(docs) for split, docs in splits.items()},
            "num_labels": len(labels),
            "labels_not_in_train": {split: int(e.n_unseen_labels.sum()) for split, e in encoded.items()},
            "build_seconds": round(seconds, 2),
        })
    print(report)
    sizes = " / ".join(f"{split} {len(docs)}" for split, docs in splits.items())
    print(f"prepared {output_dir}: {sizes} documents, {len(labels)} labels, tokenizer {tokenizer}, "
          f"max_length {max_length}, in {seconds:.1f} s ({n_docs / seconds:.0f} documents/s)")
    return output_dir


def prepare_tiny(output_dir: str | Path) -> Path:
    """The offline default for `run.py --preset tiny`: a 5,000-document synthetic corpus (4,000 train),
    4,271 concepts, a bpe:8000 tokenizer trained on it, max_length 128; builds in seconds."""
    return prepare("synthetic", output_dir, tokenizer="bpe:8000", max_length=128, synthetic_docs=5000,
                   synthetic_labels=synthetic.EURLEX_NUM_LABELS)


PRESET_SOURCES = {"synthetic_full": "synthetic-ids", "synthetic_full_eurlex_lengths": "synthetic-ids-eurlex-lengths"}


def prepare_preset(preset: str, output_dir: str | Path) -> Path:
    """The cache of an offline preset of run.py (config.PRESETS): all but `full`. The synthetic_full ones:
    random token ids at roberta-base's vocabulary size, max_length 512, 5,400 documents (4,320 train: every one
    of the 4,271 labels occurs)."""
    if preset == "tiny":
        return prepare_tiny(output_dir)
    return prepare(PRESET_SOURCES[preset], output_dir, tokenizer=f"words:{synthetic.ROBERTA_BASE_VOCAB_SIZE}",
                   max_length=512, synthetic_docs=synthetic.FULL_SIZE_CLASSIFICATION_DOCS,
                   synthetic_labels=synthetic.EURLEX_NUM_LABELS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="dataset.zip path or URL, a folder of train/dev/test.jsonl, a hub id "
                             "owner/name[@revision], 'synthetic', or a token-id corpus: "
                             + ", ".join(TOKEN_ID_SOURCES))
    parser.add_argument("--output_dir", required=True, type=Path, help="the cache directory to write")
    parser.add_argument("--tokenizer", default="roberta-base",
                        help="hub id, local tokenizer directory, bpe:SIZE (trained on the train split) "
                             "or words:SIZE (for the token-id corpora)")
    parser.add_argument("--max_length", type=int, default=512, help="tokens per document, <s> and </s> included")
    parser.add_argument("--zones", default=",".join(DEFAULT_ZONES), help=f"comma-separated, from {','.join(ZONES)}")
    parser.add_argument("--download_dir", type=Path, help="where URL sources are downloaded (default: "
                                                           "OUTPUT_DIR/../downloads)")
    parser.add_argument("--synthetic_docs", type=int, default=5000, help="synthetic source: documents (80/10/10)")
    parser.add_argument("--synthetic_labels", type=int, default=synthetic.EURLEX_NUM_LABELS,
                        help="synthetic source: number of concepts")
    parser.add_argument("--synthetic_seed", type=int, default=0, help="synthetic source: generator seed")
    parser.add_argument("--sha256", help="expected SHA-256 of the zip archive or download (refused if different)")
    for name, doc in field_docs(InputLimits).items():
        parser.add_argument(f"--{name}", type=type(getattr(InputLimits, name)), default=getattr(InputLimits, name),
                            help=doc)
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    args = parser.parse_args(argv)
    # Batch encoding and BPE training run on all cores; this process never forks after using them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        prepare(args.source, args.output_dir, tokenizer=args.tokenizer, max_length=args.max_length,
                zones=[z.strip() for z in args.zones.split(",") if z.strip()], force=args.force,
                download_dir=args.download_dir, synthetic_docs=args.synthetic_docs,
                synthetic_labels=args.synthetic_labels, synthetic_seed=args.synthetic_seed, sha256=args.sha256,
                limits=InputLimits(**{name: getattr(args, name) for name in field_docs(InputLimits)}))
    except (PrepareError, TokenizerError, FolderRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
