"""Where the EUR-Lex documents come from: every source prepare_data.py accepts, read into one `Corpus`.

  * the EURLEX57K archive's `dataset.zip` (train.jsonl, dev.jsonl, test.jsonl, possibly inside a folder), as a
    local path, an http(s) URL (downloaded with pooch, size-bounded, sha256-checked) or an extracted
    folder; any folder of jsonl files in the archive's schema (dtype_bench.synthetic.ARCHIVE_FIELDS);
  * a Hugging Face hub dataset id, `owner/name[@revision]` (`datasets.load_dataset`, column aliases below);
  * `synthetic`, and the token-id corpora `synthetic-ids[-eurlex-lengths]` (dtype_bench.synthetic).
Every record is parsed and validated here (`document_from_record`); inputs are read within `InputLimits`; a
source without a test split gives half of its validation documents to test, and says so in the corpus notes.
Bad input raises `PrepareError` with a one-line message.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import SimpleNamespace
from typing import IO

import numpy as np
import pooch
import requests
from tqdm import tqdm

from dtype_bench import synthetic
from dtype_bench.configs import field_docs
from experiments.classification.data import SPLITS
from dtype_bench.cache import disk_full
from dtype_bench.io import (
    atomic_write_json, atomic_write_text, claim_folder, current_umask, open_no_link, sha256_file,
)
from dtype_bench.tokenization import parse_words_spec

ZONES = ("title", "header", "recitals", "main_body", "attachments")
DEFAULT_ZONES = ("title", "header", "recitals", "main_body")
LABELS_FIELD = "eurovoc_concepts"
ID_FIELD = "celex_id"
# A source without a test split gives this share of its validation documents to test, drawn with this seed.
TEST_SHARE_OF_VALIDATION = 0.5
TEST_SPLIT_SEED = 0
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
    """Bytes of one line (a jsonl record, a line of a text file); a longer line is never held in memory whole."""
    max_compression_ratio: float = 100.0
    """Decompressed / compressed bytes of one zip member (text compresses 3-10x; a bomb 1,000x)."""

    def __post_init__(self) -> None:
        for name in field_docs(InputLimits):
            if not getattr(self, name) > 0:
                raise PrepareError(f"--{name} must be positive, got {getattr(self, name)}")

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        """A flag of the same name per field (a prepare_data.py's command line)."""
        for name, doc in field_docs(InputLimits).items():
            parser.add_argument(f"--{name}", type=type(getattr(InputLimits, name)),
                                default=getattr(InputLimits, name), help=doc)

    @staticmethod
    def from_flags(args: argparse.Namespace) -> "InputLimits":
        return InputLimits(**{name: getattr(args, name) for name in field_docs(InputLimits)})


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


def check_text_file(path: Path, limits: InputLimits) -> None:
    """Refuse (PrepareError, one line) a text file past `limits` or not UTF-8, reading it in chunks (memory
    within one line): a source's files are checked whole before anything is written."""
    try:
        with open(path, "rb") as stream:
            for lineno, line in enumerate(bounded_lines(stream, str(path), limits), 1):
                line.decode("utf-8")  # a line break never falls inside a UTF-8 character
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}:{lineno}: not UTF-8 text ({e.reason}, byte {e.object[e.start]:#04x})") from None
    except OSError as e:
        raise PrepareError(f"cannot read {path}: {e.strerror}") from None


def regular_path(path: Path) -> Path:
    """`path` if it is a regular file or a folder; a device (/dev/zero), pipe or socket is refused (PrepareError):
    reading one may never end."""
    if not (path.is_file() or path.is_dir()):
        raise PrepareError(f"{path} is not a regular file or folder (a device, pipe or socket): pass a file or folder")
    return path


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


def check_zip_member(zip_path: Path, member: zipfile.ZipInfo, limits: InputLimits) -> None:
    """What a member declares, before reading it: not encrypted, a compression method zipfile reads, sizes
    within `limits` (zipfile never yields more than the declared size; bounded_lines counts what is read too)."""
    where = f"{zip_path}!{member.filename}"
    if member.flag_bits & 0x1:
        raise PrepareError(f"{where} is encrypted: pass an archive without a password")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.open(member).close()  # reads the member's header only
    except (NotImplementedError, RuntimeError) as e:
        raise PrepareError(f"{where} uses compression method {member.compress_type}, which cannot be read here "
                           f"({e}): repack it with deflate") from None
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
            check_zip_member(zip_path, members[matches[0]], limits)
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
    if regular_path(path).is_dir():
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


DOWNLOADS_MARKER = ".dtype-bench-downloads.json"  # what makes a downloads folder ours (claim_folder)


class DownloadProgress(tqdm):
    """A byte progress bar for pooch.HTTPDownloader(progressbar=...), which tests the bar's truth (tqdm's is
    undefined before a total is known) before it sets the total from Content-Length."""

    def __bool__(self) -> bool:
        return True


class BoundedDownloader:
    """pooch's downloader for `url_corpus`: pooch.HTTPDownloader (requests, a timeout, a progress bar) writing
    into pooch's temporary file beside `dest`, never through a symbolic link, with the permissions of any file
    this user creates, fsynced before pooch moves it into place. A download past `max_bytes` is stopped as it
    streams (PrepareError; pooch deletes the temporary file). What was written is counted and hashed on the
    way: `size`, and `sha256` once a download completed (None while pooch reuses the file already at `dest`).
    pooch does not resume: an interrupted download is deleted, and the next attempt fetches the whole file."""

    def __init__(self, dest: Path, max_bytes: int) -> None:
        self.dest, self.max_bytes, self.size, self.sha256 = dest, max_bytes, 0, None

    def __call__(self, url: str, output_file: str, pooch_instance: object) -> None:
        print(f"note: the earlier download {self.dest} does not match its recorded SHA-256 or --sha256: "
              "downloading again" if self.dest.exists() else f"downloading {url} to {self.dest}")
        digest = hashlib.sha256()
        with os.fdopen(open_no_link(output_file, os.O_WRONLY | os.O_TRUNC), "wb") as out:
            os.fchmod(out.fileno(), 0o666 & ~current_umask())  # pooch's temporary file is 0600; downloads are shared
            def write(chunk: bytes) -> None:
                self.size += len(chunk)
                if self.size > self.max_bytes:
                    raise PrepareError(f"download of {url} is larger than {self.max_bytes:,} bytes; stopped and "
                                       "deleted (--max_file_bytes raises the limit)")
                digest.update(chunk)
                out.write(chunk)

            # Our progress bar, not pooch's: closed (its line ended) before an error is printed.
            with DownloadProgress(unit="B", unit_scale=True, desc=f"download {self.dest.name}") as progress:
                http = pooch.HTTPDownloader(progressbar=progress, chunk_size=DOWNLOAD_CHUNK_BYTES,
                                            timeout=DOWNLOAD_TIMEOUT_S)
                http(url, SimpleNamespace(write=write, flush=out.flush), pooch_instance)
            out.flush()
            os.fsync(out.fileno())
        self.sha256 = digest.hexdigest()


def failure_reason(e: requests.RequestException) -> str:
    """Why a request failed, in a few words: the timeout, the operating system's reason (Connection refused,
    Name or service not known), or the innermost error (IncompleteRead(300 bytes read, 700 more expected))."""
    cause: BaseException = e
    while True:
        if isinstance(cause, (TimeoutError, requests.Timeout)):
            return f"no answer within {DOWNLOAD_TIMEOUT_S} s"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        inner = cause.__cause__ or cause.__context__
        if inner is None:
            return str(cause) or type(cause).__name__
        cause = inner


def url_corpus(url: str, download_dir: Path, limits: InputLimits, sha256: str | None) -> Corpus:
    """An archive downloaded with pooch (`BoundedDownloader`) into `download_dir`, stored with its SHA-256
    beside it (`<file>.sha256`). That recorded SHA-256, or the one given with --sha256, is pooch's known hash:
    the stored file is reused only while it has it, else downloaded again, and a download without it is
    refused and deleted (a file at the URL that changed since its first download included: --sha256 with the
    new digest accepts it). Without --sha256 the first download is trusted and its SHA-256 printed, to be
    pinned with --sha256 next time. `download_dir` must be absent, empty or ours (it holds DOWNLOADS_MARKER):
    a user's folder of that name is refused, never written into. Unreachable URLs, HTTP errors, broken
    transfers and a full disk raise PrepareError (one line) and leave no partial file."""
    download_dir = claim_folder(download_dir, DOWNLOADS_MARKER, "dtype_bench_downloads")
    if not (download_dir / DOWNLOADS_MARKER).exists():
        atomic_write_json(download_dir / DOWNLOADS_MARKER, {"dtype_bench_downloads": "prepare_data.py URL sources"})
    if url.startswith("http://"):
        print(f"warning: {url} is plain http, which anyone on the way can alter: prefer https"
              + ("" if sha256 else ", or pass --sha256 to verify the download"), file=sys.stderr)
    basename = PurePosixPath(urllib.parse.urlparse(url).path).name or "download"
    # The url's hash in the name keeps two sources with the same basename apart.
    dest = download_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{basename}"
    recorded = dest.with_name(dest.name + ".sha256")
    known = sha256 or (recorded.read_text().strip() if recorded.exists() else None)
    if known is None and dest.exists():  # no record: not known to be the whole file
        print(f"note: the earlier download {dest} has no recorded SHA-256: downloading again")
        dest.unlink()
    downloader = BoundedDownloader(dest, limits.max_file_bytes)
    logger = pooch.get_logger()  # its lines name pooch.retrieve's arguments; ours below name the flags
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        pooch.retrieve(url, known_hash=known and f"sha256:{known}", fname=dest.name, path=download_dir,
                       downloader=downloader)
    except ValueError:
        if downloader.sha256 in (None, known):
            raise
        given = ("given with --sha256" if sha256 else f"recorded in {recorded} at the first download: the file at "
                 f"that URL changed (pass --sha256 {downloader.sha256} to accept it)")
        raise PrepareError(f"download of {url} has SHA-256 {downloader.sha256}, not the {known} {given}; "
                           "deleted it") from None
    except requests.HTTPError as e:
        raise PrepareError(f"cannot download {url}: HTTP {e.response.status_code} {e.response.reason}") from None
    except requests.RequestException as e:
        if downloader.size or isinstance(e, requests.exceptions.ChunkedEncodingError):
            raise PrepareError(f"download of {url} broke off ({failure_reason(e)}); nothing was kept: run again to "
                               "download it whole") from None
        raise PrepareError(f"cannot download {url}: {failure_reason(e)}") from None
    except OSError as e:
        reason = "No space left on device (or quota exceeded)" if disk_full(e) else e.strerror
        raise PrepareError(f"cannot write the download {dest}: {reason}; nothing was kept") from None
    finally:
        logger.setLevel(level)
    if downloader.sha256 is None:
        digest = known
        print(f"reusing download {dest} (SHA-256 {digest})")
    else:
        digest = downloader.sha256
        if not zipfile.is_zipfile(dest):
            dest.unlink()
            raise PrepareError(f"{url} did not return a zip archive ({downloader.size:,} bytes, deleted): expected "
                               "the EURLEX57K dataset.zip")
        atomic_write_text(recorded, digest + "\n")
        print(f"downloaded {downloader.size:,} bytes, SHA-256 {digest}"
              + ("" if sha256 else f" (pass --sha256 {digest} to verify it next time)"))
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
