"""Prepare the EUR-Lex cache that data.py reads: read the corpus, tokenize it once, write arrays and statistics.

    python experiments/classification/prepare_data.py --source SOURCE --output_dir DIR [--tokenizer T]
        [--max_length 512] [--zones title,header,recitals,main_body] [--download_dir DIR] [--force]
        [--synthetic_docs 5000 --synthetic_labels 4271 --synthetic_seed 0]

SOURCE is one of
  * the EURLEX57K archive: its `dataset.zip` (train.jsonl, dev.jsonl, test.jsonl, possibly inside a folder),
    as a local path, an http(s) URL (downloaded with pooch into --download_dir), or an extracted folder;
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
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a file (python experiments/classification/prepare_data.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

import numpy as np
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from experiments.classification.data import ARRAYS, CACHE_FORMAT_VERSION
from experiments.classification.sources import (
    DEFAULT_ZONES, TOKEN_ID_SOURCES, ZONES, Document, InputLimits, PrepareError, Splits, open_source,
)
from dtype_bench import synthetic
from dtype_bench.cache import CACHE_MARKER, CacheError, building_cache
from dtype_bench.io import FolderRefused, atomic_write_json, atomic_write_text, claim_folder, fingerprint
from dtype_bench.tokenization import (
    TokenizerError, bpe_identity, load_tokenizer, parse_bpe_spec, tokenizer_fingerprint, train_bpe_tokenizer,
)

# EURLEX57K paper (Chalkidis et al., 2019): frequent labels occur in more than 50 training documents.
FREQUENT_MIN_TRAIN_DOCS = 51
ENCODE_BATCH_DOCS = 1024  # per call into the Rust tokenizer, which spreads each batch over all cores


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


DEMO_DOCS, DEMO_LABELS = 8000, 200


def prepare_demo(output_dir: str | Path) -> Path:
    """The cache of `make demo` (run.py --preset demo_pretrain / demo): an 8,000-document synthetic corpus (6,400
    train), 200 concepts, a bpe:8000 tokenizer trained on it (every concept term is one token), max_length 64."""
    return prepare("synthetic", output_dir, tokenizer="bpe:8000", max_length=64, synthetic_docs=DEMO_DOCS,
                   synthetic_labels=DEMO_LABELS)


PRESET_SOURCES = {"synthetic_full": "synthetic-ids", "synthetic_full_eurlex_lengths": "synthetic-ids-eurlex-lengths"}


def prepare_preset(preset: str, output_dir: str | Path) -> Path:
    """The cache of an offline preset of run.py (config.PRESETS): all but `full`. The synthetic_full ones:
    random token ids at roberta-base's vocabulary size, max_length 512, 5,400 documents (4,320 train: every one
    of the 4,271 labels occurs)."""
    if preset == "tiny":
        return prepare_tiny(output_dir)
    if preset in ("demo_pretrain", "demo"):
        return prepare_demo(output_dir)
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
    InputLimits.add_flags(parser)
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    args = parser.parse_args(argv)
    # Batch encoding and BPE training run on all cores; this process never forks after using them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        prepare(args.source, args.output_dir, tokenizer=args.tokenizer, max_length=args.max_length,
                zones=[z.strip() for z in args.zones.split(",") if z.strip()], force=args.force,
                download_dir=args.download_dir, synthetic_docs=args.synthetic_docs,
                synthetic_labels=args.synthetic_labels, synthetic_seed=args.synthetic_seed, sha256=args.sha256,
                limits=InputLimits.from_flags(args))
    except (PrepareError, TokenizerError, FolderRefused, CacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
