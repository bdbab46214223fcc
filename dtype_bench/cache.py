"""The prepared-data cache protocol shared by the experiments' prepare_data.py and data.py: a cache is a folder
with a `meta.json` (format version, fingerprint of what determines the data, size and SHA-256 of every file),
built aside and swapped in whole (`building_cache`), verified when a run opens it (`check_cache_files`, hashed once
per process) and checked again after the run has opened its files (`check_cache_unchanged`)."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
from pathlib import Path
from typing import Callable, Iterator

from dtype_bench.io import (
    atomic_directory, atomic_write_json, claim_folder, damaged_file, file_checksums, lock, recover_interrupted_writes,
)


class CacheError(RuntimeError):
    """A prepared-data cache that is missing, stale or malformed; the message says what to do instead."""


def read_cache_meta(data_dir: Path, format_version: int) -> dict:
    """A prepared cache's meta.json, refused (CacheError) if it is missing, unreadable or of another format
    version."""
    meta_path = data_dir / "meta.json"
    if not meta_path.exists():
        raise CacheError(f"no prepared data in {data_dir} (meta.json missing)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        version = meta.get("format_version")
    except (OSError, ValueError, AttributeError) as e:
        raise CacheError(f"cache {data_dir} has an unreadable meta.json ({type(e).__name__}): delete the folder "
                         "and prepare it again") from e
    if version != format_version:
        raise CacheError(f"cache {data_dir} has format_version {version}, expected {format_version}: "
                         "prepare it again")
    return meta


_VERIFIED_CACHES: set[tuple] = set()  # caches this process checked, by folder, meta.json and file stats


def check_cache_files(data_dir: Path, meta: dict, check_content: Callable[[], None] | None = None) -> None:
    """Refuse (CacheError) a cache whose files differ from the sizes and SHA-256 recorded in its meta.json when
    it was written (a file overwritten in place with its size unchanged included): a damaged cache is never
    used. Then `check_content` (raising CacheError: token ids outside the vocabulary, say) runs. Each cache is
    checked once per process (seconds for EURLEX57K); a file changed since is checked again."""
    files = meta.get("files", {})
    try:
        stats = tuple((name, (data_dir / name).stat().st_size, (data_dir / name).stat().st_mtime_ns) for name in files)
    except OSError:
        stats = None  # a missing file: damaged_file names it
    key = (str(Path(data_dir).resolve()), json.dumps(meta, sort_keys=True), stats)
    if stats is not None and key in _VERIFIED_CACHES:
        return
    damaged = damaged_file(data_dir, files)
    if damaged:
        raise CacheError(f"cache {data_dir} is damaged: {damaged}")
    if check_content is not None:
        check_content()
    _VERIFIED_CACHES.add(key)


def check_cache_unchanged(data_dir: Path, fingerprint: str) -> None:
    """Refuse (CacheError) if the cache in `data_dir` no longer has `fingerprint`: called after a run has
    opened (memory-mapped) its files, it makes sure they are the ones the run's fingerprint names; from
    then on a rebuild (`prepare --force`) replaces the folder but not the files the run holds open."""
    try:
        current = json.loads((data_dir / CACHE_MARKER).read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        current = None
    if current != fingerprint:
        raise CacheError(f"cache {data_dir} was rebuilt while this run was opening it: run it again")


CACHE_MARKER = "meta.json"  # a prepared cache's record; also what makes a cache folder ours (claim_folder)


@contextlib.contextmanager
def building_cache(output_dir: Path, cache_fingerprint: str, format_version: int, *,
                   force: bool) -> Iterator[Path | None]:
    """What each experiment's prepare_data.py does around building its cache, under the cache's lock
    (concurrent runs wanting the same cache build it once, the others then reuse it): finish interrupted
    builds, then yield None if the cache in `output_dir` has this fingerprint and every file matches its
    recorded size and SHA-256 (unless `force`), else a temporary folder to build into, which replaces
    `output_dir` (if ours) when the block ends without error. The block writes meta.json there; the
    checksums of the other files are added to it here. A full disk (or quota) while building raises CacheError
    (one line) after the temporary folder is removed: the previous cache, if any, stays as it was."""
    output_dir = claim_folder(output_dir, CACHE_MARKER, "fingerprint")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with lock(output_dir.parent / f".{output_dir.name}.lock"):
        for done in recover_interrupted_writes(output_dir.parent, glob.escape(output_dir.name)):
            print(done)
        if not force and (output_dir / CACHE_MARKER).exists():
            try:
                meta = read_cache_meta(output_dir, format_version)
                check_cache_files(output_dir, meta)
                reusable = meta["fingerprint"] == cache_fingerprint
            except (CacheError, KeyError) as e:
                print(f"note: {e}: rebuilding it")
                reusable = False
            if reusable:
                print(f"reusing cache {output_dir} (fingerprint {cache_fingerprint})")
                yield None
                return
        try:
            with atomic_directory(output_dir, CACHE_MARKER, "fingerprint") as tmp:
                yield tmp
                meta = json.loads((tmp / CACHE_MARKER).read_text(encoding="utf-8"))
                checksums = file_checksums(tmp)
                del checksums[CACHE_MARKER]
                atomic_write_json(tmp / CACHE_MARKER, {**meta, "files": checksums})
        except Exception as e:  # tokenizers' Rust writer raises a plain Exception naming the OS error
            if not disk_full(e):
                raise
            raise CacheError(f"cannot write the cache {output_dir}: No space left on device (or quota exceeded); "
                             "nothing was left behind (free space there, or pass another output folder)") from None


def disk_full(e: BaseException) -> bool:
    """A full disk or exhausted quota: an OSError with ENOSPC/EDQUOT, or a native library's error naming them."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return f"(os error {errno.ENOSPC})" in str(e) or f"(os error {errno.EDQUOT})" in str(e)
