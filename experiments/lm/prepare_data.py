"""Prepare the language-modelling cache that data.py reads: read a text corpus, tokenize it once, write
train.bin / val.bin (uint16 token streams) and meta.json.

    python experiments/lm/prepare_data.py --source Skylion007/openwebtext --tokenizer gpt2 \\
        --output_dir data/lm/openwebtext --num_proc 8                       # the full experiment (network)
    python experiments/lm/prepare_data.py --source synthetic --tokenizer bpe:4096 --output_dir data/lm/tiny
    python experiments/lm/prepare_data.py --source my_texts/ --tokenizer bpe:8000 --output_dir data/lm/mine

SOURCE is one of
  * a Hugging Face hub dataset id, `owner/name[@revision]`, loaded with `datasets.load_dataset`: its
    `train` split's `text` column (OpenWebText has no validation split: one is held out, as below);
  * a local `.txt` file or a folder of them (searched recursively): each file is one document; every file is
    checked first (UTF-8, within --max_file_bytes and --max_line_bytes, as the classification prepare reads);
  * `synthetic`: legal-style documents from dtype_bench.synthetic (the EUR-Lex-like corpus the
    classification experiment uses), so everything runs offline;
  * `synthetic-ids`: uniformly random token ids at the vocabulary size of `--tokenizer words:SIZE` (e.g.
    words:50257, GPT-2's), 520 per document: for speed and memory at full size offline, not learnable. Drawn
    and written with numpy alone (no `datasets`, no tokenizing): the ids are the tokens.
A fraction `--val_fraction` of the documents (chosen with a fixed seed, as nanoGPT does) becomes `val`.
Every document is followed by the tokenizer's end-of-text token, then all are concatenated.

The cache is written atomically and fingerprinted over the source, the tokenizer and the options:
preparing again with the same inputs reuses it, any change rebuilds it. Bad input stops with one
`error: ...` line (exit status 2) and leaves no cache behind.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if not __package__:  # run as a file (python experiments/lm/prepare_data.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

import numpy as np
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from experiments.classification.sources import InputLimits, PrepareError, check_text_file, regular_path
from experiments.lm.data import CACHE_FORMAT_VERSION, SPLITS, TOKEN_DTYPE, bin_path
from dtype_bench import synthetic
from dtype_bench.cache import CACHE_MARKER, CacheError, building_cache
from dtype_bench.io import FolderRefused, atomic_write_json, claim_folder, fingerprint, sha256_file
from dtype_bench.tokenization import (
    SPECIAL_TOKENS, TokenizerError, bpe_identity, load_tokenizer, parse_bpe_spec, parse_words_spec,
    tokenizer_fingerprint,
)

SPLIT_SEED = 2357  # nanoGPT's, for the held-out validation documents
OWT_VAL_FRACTION = 0.0005  # nanoGPT's OpenWebText split: ~4k of 8M documents
WRITE_SHARD_DOCS = 8192  # documents per contiguous piece of the token stream written at once (bounded memory)
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?(@[\w./-]+)?")


@dataclass
class Corpus:
    identity: dict
    """What the cache fingerprint covers: changing the corpus content must not reuse a stale cache."""
    read: Callable[[], "datasets.Dataset"] | None  # noqa: F821 (imported lazily: `datasets` takes seconds to import)
    """The documents, one row each in a `text` column; called only when the cache is (re)built."""
    token_ids: Callable[[], list[np.ndarray]] | None = None
    """Instead of `read`: the documents as token ids already (no tokenizer pass, no `datasets`)."""


def synthetic_text(record: dict) -> str:
    """A synthetic EUR-Lex record as running text, zones in document order."""
    return "\n".join([record["title"], record["header"], record["recitals"], *record["main_body"],
                      record["attachments"]])


def synthetic_corpus(n_docs: int, seed: int) -> Corpus:
    def read():
        from datasets import Dataset

        return Dataset.from_dict({"text": [synthetic_text(r) for r in synthetic.generate_documents(n_docs, seed=seed)]})

    return Corpus({"kind": "synthetic", "docs": n_docs, "seed": seed,
                   "generator_version": synthetic.GENERATOR_VERSION}, read)


def token_id_corpus(tokenizer: str, n_docs: int, seed: int) -> Corpus:
    vocab_size = parse_words_spec(tokenizer)
    if vocab_size is None:
        raise PrepareError(f"source synthetic-ids is written for a words:SIZE tokenizer, got --tokenizer {tokenizer}")

    def token_ids() -> list[np.ndarray]:
        """Uniform ids in [first word id, vocab_size), `synthetic.token_id_lengths` long less the two special
        tokens, as `words:SIZE` would tokenize `synthetic.token_id_texts` (whose labels the LM has no use for)."""
        rng = np.random.default_rng(seed)
        lengths = synthetic.token_id_lengths(n_docs, "filling", rng) - 2
        return [rng.integers(len(SPECIAL_TOKENS), vocab_size, size=n, dtype=np.int64) for n in lengths]

    return Corpus({"kind": "synthetic-ids", "docs": n_docs, "seed": seed, "vocab_size": vocab_size,
                   "generator_version": synthetic.GENERATOR_VERSION, "writer": "numpy"}, None, token_ids)


def local_corpus(path: Path, limits: InputLimits) -> Corpus:
    """Every file checked (within `limits`, UTF-8) and hashed now, before anything is written; read later."""
    from datasets import Dataset

    files = sorted(f for f in path.rglob("*.txt") if f.is_file()) if regular_path(path).is_dir() else [path]
    if not files:
        raise PrepareError(f"no .txt files under {path}")
    for f in files:
        check_text_file(f, limits)
    identity = {"kind": "local", "files": {str(f.relative_to(path) if path.is_dir() else f.name): sha256_file(f)
                                           for f in files}}
    return Corpus(identity, lambda: Dataset.from_dict({"text": [f.read_text(encoding="utf-8") for f in files]}))


def hub_corpus(spec: str, num_proc: int) -> Corpus:
    """A hub dataset's train split; needs the network the first time (then the datasets cache)."""
    import datasets

    name, _, revision = spec.partition("@")
    try:
        documents = datasets.load_dataset(name, split="train", revision=revision or None, num_proc=num_proc)
    except Exception as e:  # offline, unknown id, gated...: one line, whatever datasets raised
        raise PrepareError(f"cannot load hub dataset {spec!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                           "offline, use --source synthetic or a folder of .txt files") from e
    if "text" not in documents.column_names:
        raise PrepareError(f"hub dataset {spec!r} has no 'text' column (columns: {documents.column_names})")
    identity = {"kind": "hub", "id": name, "revision": revision or None, "rows": len(documents),
                "datasets_fingerprint": documents._fingerprint}  # content hash of the loaded arrow files
    return Corpus(identity, lambda: documents.select_columns(["text"]))


def open_source(source: str, *, synthetic_docs: int, synthetic_seed: int, num_proc: int, tokenizer: str,
                limits: InputLimits) -> Corpus:
    if source == "synthetic":
        return synthetic_corpus(synthetic_docs, synthetic_seed)
    if source == "synthetic-ids":
        return token_id_corpus(tokenizer, synthetic_docs, synthetic_seed)
    path = Path(source).expanduser()
    if path.exists():
        return local_corpus(path, limits)
    if HUB_ID.fullmatch(source) and not source.startswith("."):
        return hub_corpus(source, num_proc)
    raise PrepareError(f"source {source!r} is not an existing path, a hub id or 'synthetic'")


def split_documents(documents: "datasets.Dataset", val_fraction: float) -> dict:  # noqa: F821
    """train / val by document, with a fixed seed."""
    if not any(text.strip() for text in documents["text"]):
        raise PrepareError(f"all {len(documents)} documents are empty: nothing to model")
    n_val = max(1, round(val_fraction * len(documents)))
    if len(documents) - n_val < 1:
        raise PrepareError(f"{len(documents)} documents are too few to hold out a validation split")
    held_out = documents.train_test_split(test_size=n_val, seed=SPLIT_SEED, shuffle=True)
    return {"train": held_out["train"], "val": held_out["test"]}


def tokenize(documents: "datasets.Dataset", tokenizer: PreTrainedTokenizerFast, num_proc: int,  # noqa: F821
             split: str) -> "datasets.Dataset":  # noqa: F821
    """Token ids of each document followed by the end-of-text token. A batch goes to the Rust tokenizer,
    which spreads it over all cores; num_proc > 1 adds processes on top (for corpora of millions of docs)."""
    eos = tokenizer.eos_token_id

    def encode(batch: dict) -> dict:
        # encode_batch_fast skips character offsets, which the cache does not need.
        encodings = tokenizer.backend_tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)
        ids = [e.ids + [eos] for e in encodings]
        return {"ids": ids, "len": [len(x) for x in ids]}

    return documents.map(encode, batched=True, remove_columns=["text"], num_proc=num_proc if num_proc > 1 else None,
                         desc=f"tokenizing {split}")


def write_tokens(tokens: "datasets.Dataset", path: Path, split: str) -> int:  # noqa: F821
    """Concatenate every document's ids into a uint16 memmap, shard by shard; returns the token count. The file
    is allocated first, so that a full disk is an OSError (ENOSPC) here, not a SIGBUS while writing the map."""
    total = int(np.sum(tokens["len"], dtype=np.uint64))
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, total * np.dtype(TOKEN_DTYPE).itemsize)
    stream = np.memmap(path, dtype=TOKEN_DTYPE, mode="r+", shape=(total,))
    shards, position = -(-len(tokens) // WRITE_SHARD_DOCS), 0
    for index in tqdm(range(shards), desc=f"writing {split}.bin", unit="shard"):
        shard = tokens.shard(num_shards=shards, index=index, contiguous=True).with_format("numpy")
        ids = np.concatenate(shard["ids"])
        stream[position : position + len(ids)] = ids
        position += len(ids)
    stream.flush()
    del stream
    return total


def split_token_ids(documents: list[np.ndarray], val_fraction: float) -> dict[str, list[np.ndarray]]:
    """train / val by document, with a fixed seed (numpy's permutation: not the documents `split_documents`
    would pick from the same corpus, and not meant to be)."""
    n_val = max(1, round(val_fraction * len(documents)))
    if len(documents) - n_val < 1:
        raise PrepareError(f"{len(documents)} documents are too few to hold out a validation split")
    val = set(np.random.default_rng(SPLIT_SEED).permutation(len(documents))[:n_val].tolist())
    return {"train": [d for i, d in enumerate(documents) if i not in val],
            "val": [d for i, d in enumerate(documents) if i in val]}


def write_token_ids(documents: list[np.ndarray], eos: int, path: Path) -> int:
    """Each document's ids followed by `eos`, concatenated into the uint16 stream; returns the token count."""
    stream = np.concatenate([np.append(d, eos) for d in documents]).astype(TOKEN_DTYPE)
    stream.tofile(path)
    return len(stream)


def tokenized_splits(corpus: Corpus, tokenizer: str, loaded_tokenizer: PreTrainedTokenizerFast | None,
                     bpe_size: int | None, val_fraction: float, num_proc: int,
                     tmp: Path) -> tuple[dict, dict[str, int], PreTrainedTokenizerFast]:
    """A text corpus split, tokenized (a bpe tokenizer trained on its train split first) and written into `tmp`:
    (documents per split, token counts per split, the tokenizer)."""
    splits = split_documents(corpus.read(), val_fraction)
    if loaded_tokenizer is None:
        print(f"training a byte-level BPE tokenizer ({bpe_size} tokens) on the train split")
    active = load_tokenizer(tokenizer, train_texts=(row["text"] for row in splits["train"]),
                            out_dir=tmp / "tokenizer")
    if active.eos_token_id is None:
        raise PrepareError(f"tokenizer {tokenizer!r} has no end-of-text (eos) token to separate documents")
    if len(active) > np.iinfo(TOKEN_DTYPE).max + 1:
        raise PrepareError(f"tokenizer {tokenizer!r} has {len(active)} tokens; {TOKEN_DTYPE.__name__} "
                           "token files hold at most 65,536")
    counts = {split: write_tokens(tokenize(splits[split], active, num_proc, split), bin_path(tmp, split), split)
              for split in SPLITS}
    return splits, counts, active


def prepare(source: str, output_dir: str | Path, *, tokenizer: str = "gpt2", val_fraction: float = OWT_VAL_FRACTION,
            num_proc: int = 1, synthetic_docs: int = 3000, synthetic_seed: int = 0, force: bool = False,
            limits: InputLimits = InputLimits()) -> Path:
    """Build (or reuse) the cache for `source` in `output_dir` and return its path. A `bpe:SIZE` tokenizer
    is trained on the train split; the synthetic_* options apply to the `synthetic` source only; a local
    source's files are read within `limits`."""
    output_dir = claim_folder(output_dir, CACHE_MARKER, "fingerprint")  # never replace what is not ours
    if not 0 < val_fraction < 1:
        raise PrepareError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if num_proc < 1 or synthetic_docs < 2:
        raise PrepareError(f"num_proc must be >= 1 and synthetic_docs >= 2, got {num_proc} and {synthetic_docs}")
    bpe_size = parse_bpe_spec(tokenizer)
    # A bpe tokenizer is a function of its training texts (the source) and size, so it is fingerprinted
    # before training; any other tokenizer is loaded and fingerprinted by content.
    loaded_tokenizer = None if bpe_size is not None else load_tokenizer(tokenizer)
    token_identity = bpe_identity(bpe_size) if loaded_tokenizer is None else tokenizer_fingerprint(loaded_tokenizer)
    corpus = open_source(source, synthetic_docs=synthetic_docs, synthetic_seed=synthetic_seed, num_proc=num_proc,
                         tokenizer=tokenizer, limits=limits)
    options = {"val_fraction": val_fraction, "split_seed": SPLIT_SEED, "separator": "eos_after_each_document"}
    cache_fingerprint = fingerprint(CACHE_FORMAT_VERSION, corpus.identity, token_identity, options)

    with building_cache(output_dir, cache_fingerprint, CACHE_FORMAT_VERSION, force=force) as tmp:
        if tmp is None:
            return output_dir
        started = time.perf_counter()
        if corpus.token_ids is not None:  # ids already: split and write them, no tokenizer pass
            splits = split_token_ids(corpus.token_ids(), val_fraction)
            loaded_tokenizer.save_pretrained(str(tmp / "tokenizer"))
            counts = {split: write_token_ids(splits[split], loaded_tokenizer.eos_token_id, bin_path(tmp, split))
                      for split in SPLITS}
            active = loaded_tokenizer
        else:
            splits, counts, active = tokenized_splits(corpus, tokenizer, loaded_tokenizer, bpe_size, val_fraction,
                                                      num_proc, tmp)
        seconds = time.perf_counter() - started
        atomic_write_json(tmp / "meta.json", {
            "format_version": CACHE_FORMAT_VERSION,
            "fingerprint": cache_fingerprint,
            "source": {"name": source, **corpus.identity},
            "tokenizer": {"name": tokenizer, "fingerprint": tokenizer_fingerprint(active),
                          "vocab_size": len(active), "eos_token_id": active.eos_token_id},
            "tokens": counts,
            "documents": {split: len(docs) for split, docs in splits.items()},
            "options": options,
            "build_seconds": round(seconds, 2),
        })
    print(f"prepared {output_dir}: " + " / ".join(f"{s} {counts[s]:,} tokens ({len(splits[s]):,} documents)"
                                                  for s in SPLITS)
          + f", tokenizer {tokenizer} ({len(active)} tokens), in {seconds:.1f} s")
    return output_dir


def prepare_tiny(output_dir: str | Path) -> Path:
    """The offline default for `run.py --preset tiny`: 3,000 synthetic legal documents (~2M tokens), 5% held
    out for validation, a bpe:4096 tokenizer trained on the rest; builds in seconds."""
    return prepare("synthetic", output_dir, tokenizer="bpe:4096", val_fraction=0.05, synthetic_docs=3000)


def prepare_preset(preset: str, output_dir: str | Path) -> Path:
    """The cache of an offline preset of run.py (config.PRESETS): `tiny`, or `synthetic_full`: random ids at
    GPT-2's vocabulary size (~1M tokens, 5% of the documents held out for validation)."""
    if preset == "tiny":
        return prepare_tiny(output_dir)
    return prepare("synthetic-ids", output_dir, tokenizer=f"words:{synthetic.GPT2_VOCAB_SIZE}", val_fraction=0.05,
                   synthetic_docs=synthetic.FULL_SIZE_LM_DOCS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="hub dataset id owner/name[@revision], a .txt file or folder of them, 'synthetic' "
                             "or 'synthetic-ids'")
    parser.add_argument("--output_dir", required=True, type=Path, help="the cache directory to write")
    parser.add_argument("--tokenizer", default="gpt2",
                        help="hub id, local tokenizer directory, bpe:SIZE (trained on the train split) "
                             "or words:SIZE (for synthetic-ids)")
    parser.add_argument("--val_fraction", type=float, default=OWT_VAL_FRACTION,
                        help="fraction of documents held out as the val split")
    parser.add_argument("--num_proc", type=int, default=1,
                        help="processes for loading and tokenizing (e.g. the number of cores for OpenWebText)")
    parser.add_argument("--synthetic_docs", type=int, default=3000, help="synthetic source: documents")
    parser.add_argument("--synthetic_seed", type=int, default=0, help="synthetic source: generator seed")
    InputLimits.add_flags(parser)
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    args = parser.parse_args(argv)
    # Batch encoding and BPE training run on all cores in this process.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        prepare(args.source, args.output_dir, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                num_proc=args.num_proc, synthetic_docs=args.synthetic_docs, synthetic_seed=args.synthetic_seed,
                force=args.force, limits=InputLimits.from_flags(args))
    except (PrepareError, TokenizerError, FolderRefused, CacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
