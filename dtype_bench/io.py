"""Crash-safe file primitives shared by caches, checkpoints and results.

Every writer here leaves either the old content or the complete new content on disk, never a mix:
files are written to a temporary sibling, fsynced, then renamed (rename is atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock


def fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results and caches are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json_dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `final` only if the block finishes without error.

    An exception (or a kill) leaves no directory at `final` that looks complete: the temporary one is
    removed on error, and a leftover from a kill has a `.tmp-` name that readers never open.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def json_dumps(obj: Any, **kwargs: Any) -> str:
    """JSON that keeps NaN and Infinity as such (Python's json reads them back): a diverged run is a result."""
    return json.dumps(obj, default=_json_default, allow_nan=True, **kwargs)


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line under a file lock, fsynced: concurrent writers never interleave and a kill
    at any moment leaves at most one incomplete *last* line, which `read_jsonl` reports."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json_dumps(row) + "\n"
    with FileLock(str(path) + ".lock"):
        with open(path, "a+b") as f:  # writes go to the end (O_APPEND) wherever we read
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    # A writer killed mid-line left a torn last line: end it, so it stays one reported
                    # malformed line instead of swallowing this row.
                    line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


class MalformedLine(ValueError):
    pass


def read_jsonl(path: str | Path, *, strict: bool = False) -> tuple[list[dict], list[str]]:
    """Read a JSONL file. Returns (rows, problems): each malformed line is named in `problems`
    (file and line number) rather than dropped silently; with strict=True the first one raises."""
    path = Path(path)
    rows: list[dict] = []
    problems: list[str] = []
    if not path.exists():
        return rows, problems
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                msg = f"{path}:{lineno}: malformed line ({e}): {line[:80]!r}"
                if strict:
                    raise MalformedLine(msg) from e
                problems.append(msg)
                continue
            rows.append(obj)
    return rows, problems


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (configs, file hashes, options)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=_json_default).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class CacheError(RuntimeError):
    """A prepared-data cache that is missing, stale or malformed; the message says what to do instead."""


def read_cache_meta(data_dir: Path, format_version: int) -> dict:
    """A prepared cache's meta.json, refused (CacheError) if it is missing or of another format version."""
    meta_path = data_dir / "meta.json"
    if not meta_path.exists():
        raise CacheError(f"no prepared data in {data_dir} (meta.json missing)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != format_version:
        raise CacheError(f"cache {data_dir} has format_version {meta.get('format_version')}, expected "
                         f"{format_version}: prepare it again")
    return meta
