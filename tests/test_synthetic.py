"""dtype_bench.synthetic: archive schema, determinism, EUROVOC-like label statistics, and that labels can be
learned from the start of a document (what survives truncation to 128 tokens)."""
from __future__ import annotations

import json
import hashlib
import re
import time
from collections import Counter, defaultdict

import pytest

from dtype_bench.synthetic import ARCHIVE_FIELDS, GENERATOR_VERSION, generate_documents, write_jsonl_splits

N_DOCS = 5000


@pytest.fixture(scope="module")
def documents() -> list[dict]:
    started = time.perf_counter()
    docs = generate_documents(N_DOCS)
    # The tiny preset generates this many documents on first use; it must stay a matter of seconds.
    assert time.perf_counter() - started < 10
    return docs


def test_records_follow_the_archive_schema(documents):
    for doc in documents:
        assert tuple(doc) == ARCHIVE_FIELDS
        assert all(isinstance(doc[f], str) for f in ARCHIVE_FIELDS if f not in ("main_body", "eurovoc_concepts"))
        assert doc["main_body"] and all(isinstance(article, str) for article in doc["main_body"])
        assert all(isinstance(c, str) and c.isdigit() for c in doc["eurovoc_concepts"])
        assert doc["document_type"] in ("Regulation", "Decision", "Directive")
    assert len({doc["celex_id"] for doc in documents}) == len(documents)
    first = documents[0]
    assert first["recitals"].startswith(",\nHaving regard to the Treaty") and "Whereas:" in first["recitals"]
    assert first["title"].startswith(("Commission", "Council", "European Parliament")) and first["title"].endswith("\n")


def test_same_seed_same_documents_other_seed_others(documents):
    assert generate_documents(50) == documents[:50]
    other = generate_documents(50, seed=1)
    assert [d["title"] for d in other] != [d["title"] for d in documents[:50]]


def test_label_statistics_are_eurovoc_like(documents):
    counts = [len(doc["eurovoc_concepts"]) for doc in documents]
    assert min(counts) == 2 and max(counts) == 12
    assert 4.5 < sum(counts) / len(counts) < 6.0
    assert all(len(set(doc["eurovoc_concepts"])) == len(doc["eurovoc_concepts"]) for doc in documents)
    frequency = Counter(c for doc in documents for c in doc["eurovoc_concepts"])
    ranked = [n for _, n in frequency.most_common()]
    # Long tail: a head of concepts in hundreds of documents, and most concepts in only a handful.
    assert ranked[0] > 0.1 * len(documents)
    assert ranked[len(ranked) // 2] <= 3
    assert 2000 < len(frequency) <= 4271


def test_labels_are_learnable_from_the_start_of_a_document(documents):
    """A word-cue classifier (word -> labels it predicts with precision >= 0.5 in training) that sees only
    the first 700 characters must beat always predicting the 5 most frequent labels by far."""
    train, test = documents[:4000], documents[4000:]

    def words(doc: dict) -> set[str]:
        return set(re.findall(r"[a-z]+", (doc["title"] + doc["header"] + doc["recitals"])[:700].lower()))

    doc_freq, co_freq = Counter(), Counter()
    for doc in train:
        doc_words = words(doc)
        doc_freq.update(doc_words)
        co_freq.update((w, c) for w in doc_words for c in doc["eurovoc_concepts"])
    cues = defaultdict(set)
    for (word, concept), n in co_freq.items():
        if n >= 2 and n / doc_freq[word] >= 0.5:
            cues[word].add(concept)

    def micro_f1(predictions: list[set[str]]) -> float:
        true_positives = sum(len(p & set(d["eurovoc_concepts"])) for p, d in zip(predictions, test))
        return 2 * true_positives / (sum(map(len, predictions)) + sum(len(d["eurovoc_concepts"]) for d in test))

    cue_f1 = micro_f1([set().union(*(cues[w] for w in words(doc) if w in cues)) for doc in test])
    top5 = {c for c, _ in Counter(c for d in train for c in d["eurovoc_concepts"]).most_common(5)}
    baseline_f1 = micro_f1([top5] * len(test))
    assert cue_f1 > 0.6 and cue_f1 > 3 * baseline_f1, (cue_f1, baseline_f1)
    # Not trivial: some labels have no cue near the start (silent or pushed down) and distractors exist.
    assert cue_f1 < 0.95


def test_write_jsonl_splits_uses_archive_names_and_one_stream(tmp_path, documents):
    paths = write_jsonl_splits(tmp_path, 30, 5, 7)
    assert {s: p.name for s, p in paths.items()} == {"train": "train.jsonl", "validation": "dev.jsonl",
                                                     "test": "test.jsonl"}
    read = {s: [json.loads(line) for line in p.read_text().splitlines()] for s, p in paths.items()}
    assert read["train"] == documents[:30]
    assert read["validation"] == documents[30:35]
    assert read["test"] == documents[35:42]


def test_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="n_docs"):
        generate_documents(-1)


# Digest of generate_documents(50, num_labels=30, seed=7) at GENERATOR_VERSION 1.
GENERATOR_OUTPUT_SHA256 = {1: "60dbc57da2b1793e245534d5c83671ccf0626010c9b2b113bcc286b63820b121"}


def test_generator_output_changes_only_with_its_version():
    """Caches of the synthetic corpus are fingerprinted by GENERATOR_VERSION, not by synthetic.py's bytes: a
    change of the output without a version bump would reuse stale caches. Bump it and record the new digest."""
    digest = hashlib.sha256(json.dumps(generate_documents(50, num_labels=30, seed=7), sort_keys=True).encode())
    assert GENERATOR_OUTPUT_SHA256.get(GENERATOR_VERSION) == digest.hexdigest(), (
        "generate_documents' output changed: bump synthetic.GENERATOR_VERSION and add its digest here")
