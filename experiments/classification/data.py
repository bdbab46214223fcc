"""Read the prepared EUR-Lex cache and serve batches.

Cache format (written by prepare_data.py, version 2) — one directory:
    meta.json                 format_version, fingerprint (of source + tokenizer + options), source, tokenizer
                              (name, fingerprint, vocab_size, pad/cls/sep ids), options (max_length, zones, ...),
                              splits {name: n_docs}, num_labels, labels_not_in_train {split: count}
                              files {path: {bytes, sha256}} of every other file (checked on reuse)
    labels.json               the label vocabulary: list of concept ids; position = label index
    tokenizer/                the tokenizer used (HF fast-tokenizer files), so nothing is re-fetched
    {split}.input_ids.npy     int32, all documents' token ids concatenated (already truncated, with <s> ... </s>)
    {split}.doc_offsets.npy   int64, n_docs + 1 boundaries into input_ids
    {split}.label_ids.npy     int32, all documents' label indices concatenated (labels outside the label space
                              are not stored; their count per split is in meta.json)
    {split}.label_offsets.npy int64, n_docs + 1 boundaries into label_ids
    {split}.n_unseen_labels.npy int32, n_docs: gold concepts of each document that are outside the label space
                              (seen only in validation/test); metrics count them as missed, never drop them
    stats.json, stats.md      the statistics report
Splits are `train`, `validation`, `test`. Arrays are memory-mapped: nothing is re-tokenized and no dense
multi-hot rows are stored; targets are built per batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dtype_bench.cache import CacheError, check_cache_files, check_cache_unchanged, read_cache_meta

# Part of the cache fingerprint: bump it with any change of the files or of the rules that fill them
# (prepare_data.py), so that no cache built by the old rules is reused.
CACHE_FORMAT_VERSION = 2  # 2: meta.json records each file's size and SHA-256 (`files`)
SPLITS = ("train", "validation", "test")
ARRAYS = ("input_ids", "doc_offsets", "label_ids", "label_offsets", "n_unseen_labels")


@dataclass(frozen=True)
class CacheMeta:
    path: Path
    fingerprint: str
    num_labels: int
    vocab_size: int
    pad_token_id: int
    max_length: int
    raw: dict


def read_meta(data_dir: str | Path) -> CacheMeta:
    data_dir = Path(data_dir)
    meta = read_cache_meta(data_dir, CACHE_FORMAT_VERSION)
    for split in SPLITS:
        for suffix in ARRAYS:
            if not (data_dir / f"{split}.{suffix}.npy").exists():
                raise CacheError(f"cache {data_dir} is incomplete: {split}.{suffix}.npy missing; prepare it again")
    if int(meta["num_labels"]) < 1:
        raise CacheError(f"cache {data_dir} has no labels (no training document has one): nothing to classify")
    tok = meta["tokenizer"]
    check_cache_files(data_dir, meta, lambda: check_ids_in_range(data_dir, int(tok["vocab_size"]),
                                                                 int(meta["num_labels"])))
    return CacheMeta(
        path=data_dir,
        fingerprint=meta["fingerprint"],
        num_labels=int(meta["num_labels"]),
        vocab_size=int(tok["vocab_size"]),
        pad_token_id=int(tok["pad_token_id"]),
        max_length=int(meta["options"]["max_length"]),
        raw=meta,
    )


def check_ids_in_range(data_dir: Path, vocab_size: int, num_labels: int) -> None:
    """Refuse (CacheError) a cache with a token id outside [0, vocab_size) or a label index outside
    [0, num_labels) (one pass over each memory-mapped array): the model's embedding would fail mid-run."""
    for split in SPLITS:
        for suffix, bound, what in (("input_ids", vocab_size, "token ids"), ("label_ids", num_labels, "label indices")):
            ids = np.load(data_dir / f"{split}.{suffix}.npy", mmap_mode="r")
            low, high = (int(ids.min()), int(ids.max())) if len(ids) else (0, -1)
            if low < 0 or high >= bound:
                raise CacheError(f"cache {data_dir} is damaged: {split}.{suffix}.npy has {what} in [{low}, {high}], "
                                 f"outside [0, {bound}) of its meta.json; prepare it again")


class TokenizedSplit:
    """One split of the cache: document i is input_ids[doc_offsets[i]:doc_offsets[i+1]]."""

    def __init__(self, data_dir: str | Path, split: str, max_length: int | None = None):
        data_dir = Path(data_dir)
        load = lambda suffix: np.load(data_dir / f"{split}.{suffix}.npy", mmap_mode="r")  # noqa: E731
        self.input_ids = load("input_ids")
        self.doc_offsets = np.asarray(load("doc_offsets"))
        self.label_ids = load("label_ids")
        self.label_offsets = np.asarray(load("label_offsets"))
        self.n_unseen_labels = np.asarray(load("n_unseen_labels"))
        self.max_length = max_length
        if len(self.doc_offsets) != len(self.label_offsets):
            raise CacheError(f"{data_dir}: {split} has mismatched document and label offsets")

    def __len__(self) -> int:
        return len(self.doc_offsets) - 1

    def lengths(self) -> np.ndarray:
        """Tokens of every document as served (after truncation to max_length), from the offsets alone."""
        lengths = np.diff(self.doc_offsets)
        return lengths if self.max_length is None else np.minimum(lengths, self.max_length)

    def tokens(self, i: int) -> np.ndarray:
        ids = self.input_ids[self.doc_offsets[i] : self.doc_offsets[i + 1]]
        if self.max_length is not None and len(ids) > self.max_length:
            # Shorter than the cache's length: keep </s> as the last token, as the tokenizer would have.
            ids = np.concatenate([ids[: self.max_length - 1], ids[-1:]])
        return ids

    def label_frequency(self, num_labels: int) -> float:
        """Average fraction of the label space that is positive per document."""
        return len(self.label_ids) / max(len(self), 1) / num_labels

    def labels(self, i: int) -> np.ndarray:
        return self.label_ids[self.label_offsets[i] : self.label_offsets[i + 1]]


def open_splits(meta: CacheMeta, max_length: int | None = None) -> dict[str, TokenizedSplit]:
    """Every split of the cache `meta` was read from, memory-mapped now, so that a run reports on the data
    its fingerprint names even if the cache is rebuilt while it trains (the open files stay as they were)."""
    splits = {split: TokenizedSplit(meta.path, split, max_length) for split in SPLITS}
    check_cache_unchanged(meta.path, meta.fingerprint)
    return splits


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, right-padded
    attention_mask: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, num_labels) float32 multi-hot

    def to(self, device: torch.device) -> "Batch":
        non_blocking = device.type == "cuda"
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.input_ids, self.attention_mask, self.targets)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(split: TokenizedSplit, indices: np.ndarray, num_labels: int, pad_token_id: int) -> Batch:
    """Dynamic padding to the longest document of the batch; multi-hot targets built here, per batch."""
    docs = [split.tokens(int(i)) for i in indices]
    width = max(len(d) for d in docs)
    input_ids = torch.full((len(docs), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(docs), width), dtype=torch.int64)
    targets = torch.zeros((len(docs), num_labels), dtype=torch.float32)
    for row, (i, doc) in enumerate(zip(indices, docs)):
        input_ids[row, : len(doc)] = torch.from_numpy(doc.astype(np.int64))
        attention_mask[row, : len(doc)] = 1
        targets[row, torch.from_numpy(split.labels(int(i)).astype(np.int64))] = 1.0
    if torch.cuda.is_available():
        input_ids, attention_mask, targets = (t.pin_memory() for t in (input_ids, attention_mask, targets))
    return Batch(input_ids, attention_mask, targets)


def epoch_order(n_docs: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of an epoch: a function of (seed, epoch) alone, so every config sees identical batches."""
    return np.random.default_rng([seed, epoch]).permutation(n_docs)


LENGTH_GROUP_WINDOW = 50
"""Micro-batches per window sorted by length in length-grouped order (the Hugging Face Trainer's
`group_by_length` uses the same 50): wider windows pad less but make batches less random."""


def training_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, length_grouped: bool) -> np.ndarray:
    """Document indices of one epoch, cut into micro-batches of `batch_size` in sequence; the documents left
    over after the last whole micro-batch are dropped (every micro-batch has the same size).

    `length_grouped`: the shuffled epoch order is split into windows of LENGTH_GROUP_WINDOW micro-batches,
    each window is sorted by length (so a micro-batch holds documents of similar length and pads little), and
    the micro-batches are then shuffled, except that the one holding the epoch's longest document goes first
    (a batch that runs out of memory does so at step 1, not hours in). Same documents per epoch, different
    batches: runs with and without it are not the same experiment, hence off by default and part of the setup.
    """
    order = epoch_order(len(lengths), seed, epoch)
    order = order[: len(order) - len(order) % batch_size]
    if not length_grouped:
        return order
    window = LENGTH_GROUP_WINDOW * batch_size
    by_length = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(window, len(order), window))])
    micro_batches = by_length.reshape(-1, batch_size)
    shuffled = micro_batches[np.random.default_rng([seed, epoch, 1]).permutation(len(micro_batches))]
    longest_first = np.argmax(lengths[shuffled[:, 0]])  # sorted windows put a batch's longest document first
    shuffled[[0, longest_first]] = shuffled[[longest_first, 0]]
    return shuffled.reshape(-1)


class TrainBatches:
    """Endless training micro-batches in a seed-determined order (`training_order`), resumable from a position.

    `position` (epoch, index within the epoch, and the token counts served so far) is all a checkpoint needs to
    continue the same stream and the same `padding_fraction`.

    Sharded over `world_size` ranks (DDP), the single-process stream is dealt out in turn: rank r gets
    micro-batches r, r + world_size, ...; `position` is then the same on every rank (past the last one dealt).
    """

    def __init__(self, split: TokenizedSplit, batch_size: int, seed: int, num_labels: int, pad_token_id: int,
                 rank: int = 0, world_size: int = 1, length_grouped: bool = False):
        if len(split) < batch_size:
            raise CacheError(f"training split has {len(split)} documents, fewer than batch_size {batch_size}")
        self.split, self.batch_size, self.seed, self.length_grouped = split, batch_size, seed, length_grouped
        self.num_labels, self.pad_token_id = num_labels, pad_token_id
        self.rank, self.world_size = rank, world_size
        self._lengths = split.lengths()
        self.seek({"epoch": 0, "index": 0, "tokens": 0, "padded_tokens": 0})

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "tokens": self.tokens, "padded_tokens": self.padded_tokens}

    def seek(self, position: dict) -> None:
        self.epoch, self.index = int(position["epoch"]), int(position["index"])
        self.tokens, self.padded_tokens = int(position["tokens"]), int(position["padded_tokens"])
        self._order = training_order(self._lengths, self.batch_size, self.seed, self.epoch, self.length_grouped)

    @property
    def padding_fraction(self) -> float | None:
        """Share of the token positions computed so far (all ranks) that were padding."""
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else None

    def __iter__(self) -> "TrainBatches":
        return self

    def next_indices(self) -> np.ndarray:
        """Document indices of the stream's next micro-batch (of any rank), advancing it; `__next__` collates
        this rank's. The benchmark feeds the Hugging Face Trainer the same stream through it."""
        if self.index == len(self._order):
            self.seek({**self.position, "epoch": self.epoch + 1, "index": 0})
        indices = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        lengths = self._lengths[indices]
        self.tokens += int(lengths.sum())
        self.padded_tokens += int(lengths.max()) * len(indices)
        return indices

    def __next__(self) -> Batch:
        dealt = [self.next_indices() for _ in range(self.world_size)]
        return collate(self.split, dealt[self.rank], self.num_labels, self.pad_token_id)


def eval_batches(split: TokenizedSplit, batch_size: int, num_labels: int, pad_token_id: int, limit: int | None = None):
    """Evaluation batches in document order (all documents, last batch may be short)."""
    n = len(split) if limit is None else min(limit, len(split))
    for start in range(0, n, batch_size):
        yield collate(split, np.arange(start, min(start + batch_size, n)), num_labels, pad_token_id)
