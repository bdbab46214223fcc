"""Read the prepared token streams and serve language-modelling batches.

Cache format (written by prepare_data.py, version 2), nanoGPT's layout — one directory:
    meta.json      format_version, fingerprint (of source + tokenizer + options), source, tokenizer
                   (name, fingerprint, vocab_size, eos_token_id), tokens {split: count}, options,
                   files {path: {bytes, sha256}} of every other file (checked on reuse)
    tokenizer/     the tokenizer used (HF fast-tokenizer files), so nothing is re-fetched
    train.bin      uint16 token ids of every training document concatenated, each followed by the
    val.bin        end-of-text token; raw bytes, read with np.memmap (no header)
Nothing is re-tokenized at training time; batches are windows cut from the memory-mapped streams.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from dtype_bench.cache import CacheError, check_cache_files, check_cache_unchanged, read_cache_meta

# Part of the cache fingerprint: bump it with any change of the files or of the rules that fill them
# (prepare_data.py), so that no cache built by the old rules is reused.
CACHE_FORMAT_VERSION = 2  # 2: meta.json records each file's size and SHA-256 (`files`)
SPLITS = ("train", "val")
TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit; prepare_data refuses larger vocabularies


@dataclass(frozen=True)
class CacheMeta:
    path: Path
    fingerprint: str
    vocab_size: int
    eos_token_id: int
    tokens: dict[str, int]
    raw: dict


def bin_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.bin"


def read_meta(data_dir: str | Path) -> CacheMeta:
    data_dir = Path(data_dir)
    meta = read_cache_meta(data_dir, CACHE_FORMAT_VERSION)
    for split in SPLITS:
        path, expected = bin_path(data_dir, split), int(meta["tokens"][split]) * np.dtype(TOKEN_DTYPE).itemsize
        if not path.exists() or path.stat().st_size != expected:
            raise CacheError(f"cache {data_dir} is incomplete: {path.name} missing or not {expected} bytes; "
                             "prepare it again")
    vocab_size = int(meta["tokenizer"]["vocab_size"])

    def check_ids_in_range() -> None:  # one pass over each memory-mapped stream: the embedding would fail mid-run
        for split in SPLITS:
            tokens = np.memmap(bin_path(data_dir, split), dtype=TOKEN_DTYPE, mode="r")
            if len(tokens) and tokens.max() >= vocab_size:
                raise CacheError(f"cache {data_dir} is damaged: {split}.bin has token id {tokens.max()}, outside "
                                 f"the vocabulary of {vocab_size} in its meta.json; prepare it again")

    check_cache_files(data_dir, meta, check_ids_in_range)
    return CacheMeta(path=data_dir, fingerprint=meta["fingerprint"], vocab_size=vocab_size,
                     eos_token_id=int(meta["tokenizer"]["eos_token_id"]),
                     tokens={s: int(meta["tokens"][s]) for s in SPLITS}, raw=meta)


def load_tokens(meta: CacheMeta, split: str) -> np.memmap:
    return np.memmap(bin_path(meta.path, split), dtype=TOKEN_DTYPE, mode="r")


def open_splits(meta: CacheMeta) -> dict[str, np.memmap]:
    """Both token streams of the cache `meta` was read from, memory-mapped now, so that a run trains and
    validates on the data its fingerprint names even if the cache is rebuilt meanwhile."""
    streams = {split: load_tokens(meta, split) for split in SPLITS}
    check_cache_unchanged(meta.path, meta.fingerprint)
    return streams


class Batch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64: input_ids shifted left by one token

    def to(self, device: torch.device) -> "Batch":
        non_blocking = device.type == "cuda"
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> Batch:
    """Sequences tokens[s : s+T] with next-token targets tokens[s+1 : s+T+1], for each start s."""
    rows = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)
    batch = torch.from_numpy(rows)
    if torch.cuda.is_available():
        batch = batch.pin_memory()
    return Batch(batch[:, :-1], batch[:, 1:])


def check_length(tokens: np.ndarray, block_size: int, split: str) -> None:
    if len(tokens) <= block_size:
        raise CacheError(f"the {split} split has {len(tokens)} tokens, not more than block_size {block_size}")


class TrainBatches:
    """Endless micro-batches of random windows of the training stream, as nanoGPT samples them.

    Micro-batch k's window starts are drawn from a generator seeded with (seed, k) alone, so every config
    trains on identical batches and `position` (k) is all a checkpoint needs to continue the same stream.
    Sharded over `world_size` ranks (DDP), rank r gets micro-batches r, r + world_size, ... of that stream.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        check_length(tokens, block_size, "train")
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.index = 0  # the next micro-batch of the single-process stream (the same on every rank)

    @property
    def position(self) -> dict:
        return {"index": self.index}

    def seek(self, position: dict) -> None:
        self.index = int(position["index"])

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> Batch:
        rng = np.random.default_rng([self.seed, self.index + self.rank])
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        self.index += self.world_size
        return windows(self.tokens, starts, self.block_size)


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, max_sequences: int | None) -> Iterator[Batch]:
    """The validation set: consecutive non-overlapping windows from the start of the stream (at most
    `max_sequences`), the same for every config and seed so validation losses compare directly."""
    check_length(tokens, block_size, "val")
    starts = np.arange(0, len(tokens) - block_size, block_size)[:max_sequences]
    for i in range(0, len(starts), batch_size):
        yield windows(tokens, starts[i : i + batch_size], block_size)
