"""Crash-safe file primitives shared by caches, checkpoints, results and analyses.

Every writer here leaves either the old content or the complete new content on disk, never a mix:
files are written to a temporary sibling, fsynced, then renamed (rename is atomic on POSIX), and the
directory is fsynced so that the rename survives a power cut.

Nothing a user owns is ever replaced: every folder the project writes goes through `claim_folder`,
which accepts only an absent path, an empty folder, or a folder holding the project's own marker file.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from filelock import FileLock


def fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Persist every file and folder under `root` (before renaming it into place: a rename can reach the
    disk before the data it names)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


class FolderRefused(RuntimeError):
    """A folder the project was asked to write is not its own to write (one line: what is there, what to do)."""


def claim_folder(path: str | Path, marker: str, key: str) -> Path:
    """May the project write the folder `path`? Yes if it is absent, an empty folder, or a folder holding
    `marker`: a JSON object with `key`, which only the project writes there (a cache's meta.json, a results
    directory's setup.json, a checkpoint's manifest.json, an analysis' analysis.json). Anything else (a file,
    a user's folder, the raw data, an unreadable marker, a path this user cannot write) raises FolderRefused,
    before any work. Returns the path with symlinks resolved: a folder swapped into place replaces the
    link's target and keeps the link."""
    path = Path(path).expanduser()
    try:
        real = path.resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop
        raise FolderRefused(f"cannot use {path}: {e}") from None
    too_long = [part for part in real.parts if len(part.encode()) > 255]
    if too_long:
        raise FolderRefused(f"cannot use that folder: its name {too_long[0][:40]}... is {len(too_long[0].encode())} "
                            "bytes long, more than a file system allows (255)")
    if real.exists() and not real.is_dir():
        raise FolderRefused(f"{path} is a file, not a folder: pass a new or empty folder")
    if real.is_dir():
        entries = sorted(p.name for p in real.iterdir())
        if entries:
            try:
                owned = key in json.loads((real / marker).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise FolderRefused(
                    f"{path} is not empty and holds no {marker} of ours (it has {', '.join(entries[:3])}"
                    f"{', ...' if len(entries) > 3 else ''}): refusing to write there; pass a new or empty folder"
                ) from None
            except (OSError, ValueError, TypeError) as e:  # unreadable, not JSON, not an object
                raise FolderRefused(f"{path}/{marker} is unreadable ({type(e).__name__}), so {path} may not be "
                                    "ours: refusing to write there; delete it or pass another folder") from e
            if not owned:
                raise FolderRefused(f"{path}/{marker} was not written by dtype-bench (no {key!r}): refusing to "
                                    "write there; pass a new or empty folder")
    existing = next(p for p in (real, *real.parents) if p.exists())
    if not existing.is_dir():
        raise FolderRefused(f"cannot create {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FolderRefused(f"cannot write {path}: {existing} is not writable by this user")
    return real


def open_no_link(path: str | Path, flags: int, mode: int = 0o666) -> int:
    """`os.open` that refuses a symbolic link at `path` (FolderRefused, one line) instead of writing through
    it: a link in one of our folders may point at a file that is not ours. Returns the file descriptor."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FolderRefused(f"{path} is a symbolic link: refusing to write through it (it may point at a file "
                                "that is not dtype-bench's); remove the link") from None
        raise


def lock(path: str | Path) -> FileLock:
    """A FileLock at `path`, refused (FolderRefused) if `path` is a symbolic link: filelock opens its file
    with O_TRUNC, which would empty whatever the link points at."""
    if os.path.islink(path):
        raise FolderRefused(f"{path} is a symbolic link: refusing to use it as a lock file (locking truncates "
                            "it); remove the link")
    return FileLock(str(path))


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-[^/]*")
LEFTOVER_MARKER = ".dtype-bench-leftover.json"  # inside every folder `atomic_directory` may leave behind


def _mark_leftover(folder: Path, purpose: str, name: str | None = None) -> None:
    """Say inside `folder` that it is ours under the name `name` (default: its own; the name it is about to be
    renamed to), for `purpose`, the process writing it: what a kill would leave it as."""
    atomic_write_json(folder / LEFTOVER_MARKER, {"dtype_bench_leftover": name or folder.name, "purpose": purpose,
                                                 "pid": os.getpid()})


def _is_our_leftover(folder: Path) -> bool:
    """Did `atomic_directory` leave `folder` under this very name? Only a folder whose marker names it does: a
    user's `.x.old-mybackup`, or a copy of one of ours under another name, does not."""
    try:
        marker = json.loads((folder / LEFTOVER_MARKER).read_text(encoding="utf-8"))
        return isinstance(marker, dict) and marker.get("dtype_bench_leftover") == folder.name
    except (OSError, ValueError):
        return False


def recover_interrupted_writes(parent: str | Path, names: str) -> list[str]:
    """Finish what a killed `atomic_directory` left in `parent` for folders whose names match the glob `names`,
    and say what was done. A kill between the swap's two renames leaves the previous folder under its
    `.old-` name and none under its own: it is put back. Temporary folders (`.tmp-`, possibly gigabytes) and
    superseded `.old-` ones are removed. Only folders that carry our marker under their own name are touched
    (a user's folder with a look-alike name is left as it is). Call it only while no other process writes
    those folders."""
    parent, done = Path(parent), []
    if not parent.is_dir():
        return done
    leftovers = sorted((p for p in parent.iterdir() if (m := _LEFTOVER.fullmatch(p.name))
                        and fnmatch.fnmatchcase(m["name"], names) and not p.is_symlink() and p.is_dir()
                        and _is_our_leftover(p)), key=lambda p: p.stat().st_mtime)
    for path in reversed(leftovers):  # the newest previous folder is the one to put back
        match = _LEFTOVER.fullmatch(path.name)
        final = parent / match["name"]
        if match["kind"] == "old" and not final.exists() and not final.is_symlink():
            os.replace(path, final)
            (final / LEFTOVER_MARKER).unlink()
            fsync_dir(parent)
            done.append(f"restored {final} from {path.name} (a write was killed between its two renames)")
        else:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(path)
            done.append(f"removed {path} ({size:,} bytes) left by an interrupted write")
    return done


def current_umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; results and caches are meant to be shared
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
def atomic_directory(final: str | Path, marker: str, key: str) -> Iterator[Path]:
    """Yield a temporary directory that replaces `final` only if the block finishes without error, and only
    if `final` is the project's to replace (`claim_folder` with `marker` and `key`).

    An exception (or a kill) leaves no directory at `final` that looks complete: the temporary one is
    removed on error, and a leftover from a kill has a `.tmp-` name that readers never open (and that
    `recover_interrupted_writes` removes). The new folder is durable before the previous one is removed.
    """
    final = claim_folder(final, marker, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700
        _mark_leftover(tmp, f"a temporary build of {final.name}")
        yield tmp
        fsync_tree(tmp)
        old = None
        if final.exists() and any(final.iterdir()):  # rename replaces an empty folder by itself
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            _mark_leftover(final, f"the previous {final.name}, being replaced", old.name)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        (final / LEFTOVER_MARKER).unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    """Append one JSON line under a file lock, fsynced: concurrent writers never interleave, a kill at any
    moment leaves at most one incomplete *last* line, which `read_jsonl` reports, and a failed write (a
    full disk) is undone, leaving the file byte-identical. The line goes out in unbuffered writes (nothing is
    flushed again after the undo); a symbolic link at `path` is refused, never written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json_dumps(row) + "\n").encode("utf-8")
    with lock(str(path) + ".lock"):
        created = not path.exists()
        fd = open_no_link(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            size = os.fstat(fd).st_size
            if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
                # A writer killed mid-line left a torn last line: end it, so it stays one reported
                # malformed line instead of swallowing this row.
                line = b"\n" + line
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)


class MalformedLine(ValueError):
    pass


def read_jsonl(path: str | Path, *, strict: bool = False,
               validate: Callable[[dict], str | None] | None = None) -> tuple[list[dict], list[str]]:
    """Read a JSONL file. Returns (rows, problems): each malformed line (not JSON, not an object, nested too
    deep to parse, or refused by `validate`, which returns what is wrong with a row or None) is named in
    `problems` (file and line number) rather than dropped silently; with strict=True the first one raises."""
    path = Path(path)
    rows: list[dict] = []
    problems: list[str] = []
    if not path.exists():
        return rows, problems
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")  # a non-UTF-8 byte is one bad line, not an unreadable file
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                if validate is not None and (problem := validate(obj)):
                    raise ValueError(problem)
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError included
                msg = f"{path}:{lineno}: malformed line ({str(e)[:200] or type(e).__name__}): {raw[:80]!r}"
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


def file_checksums(directory: Path, names: Iterable[str] | None = None) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of the files `names` in `directory` (default: every file under it, by
    relative path), recorded when they are written so that a reader can tell a damaged file."""
    if names is None:
        names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                       if p.is_file() and p.name != LEFTOVER_MARKER)
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
            for name in names}


def _inside(path: Path, directory: Path) -> bool:
    """`path` names a file under `directory` without a symbolic link or `..` leading out of it."""
    return not path.is_symlink() and path.resolve().is_relative_to(directory.resolve())


def damaged_file(directory: Path, checksums: dict[str, dict]) -> str | None:
    """The first file of `checksums` that is outside `directory`, missing, or differs from its recorded size or
    SHA-256, as "name (why)"; None if all match."""
    for name, expected in checksums.items():
        path = directory / name
        if not _inside(path, directory):
            return f"{name} (outside {directory}: refused)"
        if not path.is_file():
            return f"{name} (missing)"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} ({path.stat().st_size:,} bytes, {expected['bytes']:,} recorded)"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} (SHA-256 differs from the recorded one)"
    return None


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (configs, file hashes, options)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=_json_default).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
