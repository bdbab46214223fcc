"""A deterministic synthetic corpus shaped like EURLEX57K, for offline runs and tests.

Records follow the EURLEX57K archive schema exactly (`ARCHIVE_FIELDS`), so the synthetic corpus goes
through the same preparation code as the real archive. The text is legal-style English; labels are
EUROVOC-like numeric concept ids with a long-tailed (Zipf-Mandelbrot) frequency.

Labels are learnable from the text: every concept owns a few made-up, word-like terms, and a document
mentions one of them for each of its labels, mostly in the title and otherwise in the opening "Having
regard to" lines of the recitals, so that truncation to 128 tokens keeps most of the signal. It is not trivial: some labels are silent (no
term anywhere), terms of concepts that are *not* labels appear as distractors further down, and a
concept is signalled by any one of several synonyms.

Everything comes from one `random.Random(seed)` stream, so the output is a function of the arguments, and
the first n documents of a longer run are the n documents of a shorter one.
"""
from __future__ import annotations

import functools
import itertools
import json
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtype_bench.io import atomic_write_text

# Part of every cache fingerprint taken over a synthetic corpus, instead of this file's bytes (a comment edit
# must not orphan results). Bump it with any change of what generate_documents returns for given arguments;
# tests/test_synthetic.py pins a digest of the output, so a change that forgets the bump fails there.
GENERATOR_VERSION = 1

ARCHIVE_FIELDS = (
    "celex_id", "uri", "document_type", "title", "header", "recitals", "main_body", "attachments", "eurovoc_concepts",
)
# Our split name -> the archive's file name (the archive calls the validation split "dev").
ARCHIVE_SPLIT_FILES = {"train": "train.jsonl", "validation": "dev.jsonl", "test": "test.jsonl"}

EURLEX_NUM_LABELS = 4271  # distinct EUROVOC concepts in EURLEX57K

# Zipf-Mandelbrot frequency p(rank) ~ 1 / (rank + OFFSET) ** EXPONENT: with ~4k documents the most
# frequent concept is in about 18% of them and roughly half of all concepts are seen at most once.
ZIPF_EXPONENT = 1.1
ZIPF_OFFSET = 5
# Labels per document, 2..12 with mean ~5.2 as in EURLEX57K.
LABEL_COUNTS = tuple(range(2, 13))
LABEL_COUNT_WEIGHTS = (6, 12, 21, 20, 15, 10, 6, 4, 3, 2, 1)
# Where a label's term goes: in the title with TITLE_PROB, else in the first recital, except that a
# SILENT_PROB fraction of labels is not mentioned at all (label noise the model cannot recover).
TITLE_PROB = 0.85
SILENT_PROB = 0.03
# Share of labels also mentioned in an article (beyond 128 tokens: signal only for longer max_length).
LABEL_ARTICLE_PROB = 0.5

_ONSETS = "b br c ch cl d dr f fl g gr h j k l m n p pl pr r s sc st t tr v z".split()
_NUCLEI = "a e i o u ae ei ia io ou".split()
_SUFFIXES = "ation ine ite ism ary ology ic ure ment age ide ant ose".split()
_DOMAIN_NOUNS = (
    "products", "measures", "sector", "aid", "market", "producers", "services", "undertakings",
    "fisheries", "imports", "exports", "stocks", "operators", "substances", "vessels", "areas",
)
_ISSUERS = (("Commission", "THE EUROPEAN COMMISSION"), ("Council", "THE COUNCIL OF THE EUROPEAN UNION"),
            ("European Parliament and Council", "THE EUROPEAN PARLIAMENT AND THE COUNCIL OF THE EUROPEAN UNION"))
_DOCUMENT_TYPES = (("Regulation", "R"), ("Decision", "D"), ("Directive", "L"))
_DOCUMENT_TYPE_WEIGHTS = (55, 35, 10)
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_MEMBER_STATES = ("Belgium", "Denmark", "Germany", "Greece", "Spain", "France", "Ireland", "Italy",
                  "Luxembourg", "the Netherlands", "Austria", "Portugal", "Finland", "Sweden", "Poland")
_TITLE_CONNECTIVES = ("on", "concerning", "as regards", "laying down detailed rules for", "amending the rules on",
                      "on the implementation of rules on", "establishing measures for")
_RECITAL_TEMPLATES = (
    "It is necessary to ensure that the provisions of this {act} are applied uniformly in all Member States.",
    "In accordance with Article {n} of {ref}, the Commission has examined the information provided by {state}.",
    "The measures provided for in this {act} are in accordance with the opinion of the Committee referred to "
    "in Article {n} of {ref}.",
    "Experience has shown that the rules laid down in {ref} should be clarified in order to avoid divergent "
    "interpretations.",
    "{state} has submitted a request under Article {n} of {ref}; the request contains all the information required.",
    "For reasons of legal certainty, this {act} should apply from the {day} day following that of its publication.",
    "The amounts referred to in Article {n} should be adjusted to take account of the situation on the market.",
    "Since the objective of this {act} cannot be sufficiently achieved by the Member States, the Union may adopt "
    "measures in accordance with the principle of subsidiarity.",
    "The Member States should lay down rules on penalties applicable to infringements of this {act}.",
    "It is appropriate to provide for a transitional period of {n} months for operators to adapt.",
)
_DISTRACTOR_TEMPLATES = (
    "This {act} is without prejudice to the rules applicable to {term}.",
    "The provisions of {ref} relating to {term} are not affected by this {act}.",
    "Questions concerning {term} will be examined separately.",
)
_ARTICLE_TEMPLATES = (
    "The Member States shall take the measures necessary to comply with this {act} by {date}.",
    "The competent authorities of {state} shall notify the Commission of the measures adopted under Article {n}.",
    "{ref} is hereby amended as follows: in Article {n}, paragraph {m} is replaced by the text set out in the Annex.",
    "The quantities referred to in Article {n} shall not exceed {amount} tonnes per marketing year.",
    "Applications shall be lodged with the competent authority no later than {date}.",
    "The Commission shall review the application of this {act} before {date} and report to the Council.",
)
_LABEL_ARTICLE_TEMPLATES = (
    "The rules on {term} laid down in Article {n} shall apply to all operators established in the Union.",
    "Member States shall ensure that {term} complies with the requirements set out in Annex {m}.",
)


@functools.cache
def _template_fields(template: str) -> tuple[str, ...]:
    return tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)


@dataclass(frozen=True)
class Concept:
    concept_id: str
    terms: tuple[str, ...]  # synonyms: any one of them in a document signals the concept


def build_concepts(num_labels: int, rng: random.Random) -> list[Concept]:
    """Concepts in frequency-rank order (rank 0 is the most frequent), each with its own made-up terms."""
    # EUROVOC descriptor ids are numeric strings of up to 4-5 digits; ids are unrelated to frequency.
    ids = rng.sample(range(1, max(10_000, 3 * num_labels)), num_labels)
    used_words: set[str] = set()

    def new_word() -> str:
        while True:
            syllables = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) for _ in range(rng.randint(1, 2)))
            word = syllables + rng.choice(_SUFFIXES)
            if word not in used_words:
                used_words.add(word)
                return word

    concepts = []
    for concept_id in ids:
        # Two single words plus a phrase: the model must map several surface forms to one label.
        terms = (new_word(), new_word(), f"{new_word()} {rng.choice(_DOMAIN_NOUNS)}")
        concepts.append(Concept(str(concept_id), terms))
    return concepts


class _DocumentWriter:
    """Generates documents one after another from a shared random stream."""

    def __init__(self, concepts: list[Concept], rng: random.Random):
        self.concepts = concepts
        self.rng = rng
        weights = [1.0 / (rank + 1 + ZIPF_OFFSET) ** ZIPF_EXPONENT for rank in range(len(concepts))]
        self.cum_label_weights = list(itertools.accumulate(weights))
        self.cum_count_weights = list(itertools.accumulate(LABEL_COUNT_WEIGHTS))
        self.slot_drawers: dict[str, Callable[[], object]] = {
            "ref": self.reference, "n": lambda: rng.randint(1, 30), "m": lambda: rng.randint(1, 6),
            "day": lambda: rng.choice(("third", "twentieth")), "state": lambda: rng.choice(_MEMBER_STATES),
            "amount": lambda: rng.randint(100, 90_000), "date": self.date,
        }

    def sample_labels(self) -> list[Concept]:
        rng = self.rng
        n_labels = min(rng.choices(LABEL_COUNTS, cum_weights=self.cum_count_weights)[0], len(self.concepts))
        chosen: dict[int, None] = {}  # insertion-ordered set of ranks
        while len(chosen) < n_labels:
            for rank in rng.choices(range(len(self.concepts)), cum_weights=self.cum_label_weights, k=2 * n_labels):
                chosen.setdefault(rank)
                if len(chosen) == n_labels:
                    break
        return [self.concepts[rank] for rank in chosen]

    def fill(self, template: str, act: str, **slots: str) -> str:
        """The template with its random slots filled; only the slots it uses are drawn (a third faster than
        drawing all of them)."""
        draw = self.slot_drawers
        return template.format(act=act, **slots, **{f: draw[f]() for f in _template_fields(template) if f in draw})

    def date(self) -> str:
        rng = self.rng
        return f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1958, 2016)}"

    def reference(self) -> str:
        rng = self.rng
        kind = rng.choice(("Regulation (EEC)", "Regulation (EC)", "Directive", "Council Decision"))
        return f"{kind} No {rng.randint(1, 3000)}/{rng.randint(60, 99)}"

    def document(self, index: int) -> dict:
        rng = self.rng
        labels = self.sample_labels()
        issuer, issuer_caps = rng.choice(_ISSUERS)
        doc_type, celex_letter = rng.choices(_DOCUMENT_TYPES, weights=_DOCUMENT_TYPE_WEIGHTS)[0]
        year = 1970 + index % 47
        number = index // 47 + 1
        date = f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {year}"

        title_terms, recital_terms = [], []
        for concept in labels:
            draw = rng.random()
            if draw < SILENT_PROB:
                continue
            (title_terms if draw < SILENT_PROB + TITLE_PROB else recital_terms).append(rng.choice(concept.terms))
        purpose = " and ".join(f"{rng.choice(_TITLE_CONNECTIVES)} {term}" for term in title_terms) or "on procedure"
        title = f"{issuer} {doc_type} (EC) No {number}/{year} of {date} {purpose}\n"
        header = (
            f"{rng.randint(1, 28)}.{rng.randint(1, 12)}.{year} EN Official Journal of the European Union "
            f"L {rng.randint(1, 350)}/{rng.randint(1, 90)}\n{issuer.upper()} {doc_type.upper()} (EC) No "
            f"{number}/{year}\nof {date}\n{issuer_caps},"
        )

        recitals = [",", "Having regard to the Treaty on the Functioning of the European Union,"]
        recitals += [f"Having regard to {self.reference()} on {term}," for term in recital_terms]
        recitals.append("Whereas:")
        bodies = [self.fill(rng.choice(_RECITAL_TEMPLATES), doc_type) for _ in range(rng.randint(3, 16))]
        for concept in (rng.choice(self.concepts) for _ in range(rng.randint(0, 3))):
            if concept not in labels:
                distractor = self.fill(rng.choice(_DISTRACTOR_TEMPLATES), doc_type,
                                       term=rng.choice(concept.terms))
                # Never first: distractors should rarely survive truncation to 128 tokens.
                bodies.insert(rng.randint(1, len(bodies)), distractor)
        recitals += [f"({i}) {text}" for i, text in enumerate(bodies, 1)]

        articles = [
            " ".join(self.fill(rng.choice(_ARTICLE_TEMPLATES), doc_type) for _ in range(rng.randint(1, 3)))
            for _ in range(rng.randint(1, 10))
        ]
        articles += [self.fill(rng.choice(_LABEL_ARTICLE_TEMPLATES), doc_type, term=rng.choice(c.terms))
                     for c in labels if rng.random() < LABEL_ARTICLE_PROB]
        articles.append(f"This {doc_type} shall enter into force on the twentieth day following that of its publication.")

        return {
            "celex_id": f"3{year}{celex_letter}{number:04d}",
            "uri": f"http://publications.europa.eu/resource/cellar/{uuid.UUID(int=rng.getrandbits(128), version=4)}",
            "document_type": doc_type,
            "title": title,
            "header": header,
            "recitals": "\n".join(recitals),
            "main_body": articles,
            "attachments": f"Done at Brussels, {date}.\nFor the {issuer}\nThe President",
            "eurovoc_concepts": [concept.concept_id for concept in labels],
        }


def generate_documents(n_docs: int, *, num_labels: int = EURLEX_NUM_LABELS, seed: int = 0) -> list[dict]:
    """`n_docs` records in the EURLEX57K archive schema; the same arguments always give the same records."""
    if n_docs < 0 or num_labels < 1:
        raise ValueError(f"need n_docs >= 0 and num_labels >= 1, got n_docs={n_docs}, num_labels={num_labels}")
    rng = random.Random(seed)
    writer = _DocumentWriter(build_concepts(num_labels, rng), rng)
    return [writer.document(index) for index in range(n_docs)]


def write_jsonl_splits(
    out_dir: str | Path, n_train: int, n_validation: int, n_test: int, seed: int = 0,
    num_labels: int = EURLEX_NUM_LABELS,
) -> dict[str, Path]:
    """Write train.jsonl, dev.jsonl and test.jsonl (the archive's names) from one document stream, so all
    splits share the same concepts and label distribution. Returns {our split name: path}."""
    documents = generate_documents(n_train + n_validation + n_test, num_labels=num_labels, seed=seed)
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_validation),
              "test": (n_train + n_validation, len(documents))}
    out_dir = Path(out_dir)
    paths = {}
    for split, (start, stop) in bounds.items():
        paths[split] = out_dir / ARCHIVE_SPLIT_FILES[split]
        atomic_write_text(paths[split], "".join(json.dumps(doc) + "\n" for doc in documents[start:stop]))
    return paths


# ------------------------------------------------------------------------------- token-id corpora

ROBERTA_BASE_VOCAB_SIZE = 50_265
GPT2_VOCAB_SIZE = 50_257
FULL_SIZE_CLASSIFICATION_DOCS = 5_400
"""Token-id classification corpus at full size: 4,320 train documents (80%), so all 4,271 labels occur."""
FULL_SIZE_LM_DOCS = 2_000
"""Token-id LM corpus at full size: ~1M tokens, of which 5% (~51k) are held out for validation."""
ID_WORD = "w{}"
"""Token id i written as a word, for the `words:SIZE` tokenizer (dtype_bench.tokenization) to map back to i."""
TOKEN_ID_LENGTHS = ("filling", "eurlex_sample")
"""Length distributions of the token-id corpora: every document longer than roberta-base's 512 positions, or
the token lengths of real EURLEX57K documents."""
FILLING_WORDS = 520
"""Words (= tokens) of a `filling` document: more than 512, so every document fills max_length <= 512."""
EURLEX_SAMPLE_LENGTH_PERCENTILES = (204, 314, 367, 410, 454, 472, 489, 507, 542, 570, 631, 690, 755, 826, 914,
                                    1008, 1134, 1326, 1491, 2361, 4108)
"""Percentiles 0, 5, ..., 100 of the token length (<s> and </s> included) of the 200 real EURLEX57K documents in
`../shared/data/eurlex57k-sample` (zones title, header, recitals, main_body), tokenized with a bpe:8000
tokenizer trained on its 100 training documents: 36% are at most 512 tokens, the median is 631. roberta-base's
tokenizer cannot be loaded offline, so its lengths are not these (a general 50k BPE splits legal text
differently); tests/test_synthetic.py re-measures them when the sample is present."""


def token_id_lengths(n_docs: int, lengths: str, rng: np.random.Generator) -> np.ndarray:
    """Tokens per document (special tokens included) under a `TOKEN_ID_LENGTHS` distribution."""
    if lengths == "filling":
        return np.full(n_docs, FILLING_WORDS + 2)
    if lengths == "eurlex_sample":  # inverse CDF, linear between the recorded percentiles
        percentiles = np.linspace(0, 100, len(EURLEX_SAMPLE_LENGTH_PERCENTILES))
        return np.rint(np.interp(rng.uniform(0, 100, n_docs), percentiles,
                                 EURLEX_SAMPLE_LENGTH_PERCENTILES)).astype(np.int64)
    raise ValueError(f"lengths must be one of {TOKEN_ID_LENGTHS}, got {lengths!r}")


def token_id_texts(n_docs: int, *, vocab_size: int, lengths: str, num_labels: int, seed: int = 0,
                   first_id: int = 5) -> list[tuple[str, list[str]]]:
    """(text, concept ids) of `n_docs` documents of uniformly random token ids in [first_id, vocab_size), written
    as the words the `words:SIZE` tokenizer (dtype_bench.tokenization) maps back to those ids; lengths count
    the <s> and </s> that tokenizer adds. Nothing here is learnable: these corpora exist to run a model of a
    real vocabulary size and sequence length offline, for speed and memory, never for quality.

    Labels: document i has concept `i % num_labels` (so the first num_labels documents use every concept and a
    classifier trained on them has exactly num_labels outputs) plus others drawn with the Zipf-Mandelbrot
    frequency of `generate_documents`, LABEL_COUNTS per document in all."""
    if n_docs < 0 or num_labels < 1 or vocab_size <= first_id:
        raise ValueError(f"need n_docs >= 0, num_labels >= 1, vocab_size > {first_id}; got {n_docs}, {num_labels}, "
                         f"{vocab_size}")
    rng = np.random.default_rng(seed)
    n_tokens = token_id_lengths(n_docs, lengths, rng) - 2
    label_counts = rng.choice(LABEL_COUNTS, size=n_docs, p=np.array(LABEL_COUNT_WEIGHTS) / sum(LABEL_COUNT_WEIGHTS))
    zipf = 1.0 / (np.arange(num_labels) + 1 + ZIPF_OFFSET) ** ZIPF_EXPONENT
    documents = []
    for i, (length, n_labels) in enumerate(zip(n_tokens, label_counts)):
        ids = rng.integers(first_id, vocab_size, size=length)
        others = rng.choice(num_labels, size=min(n_labels, num_labels) - 1, replace=False, p=zipf / zipf.sum())
        labels = dict.fromkeys([i % num_labels, *others.tolist()])
        documents.append((" ".join(map(ID_WORD.format, ids.tolist())), [str(c) for c in labels]))
    return documents
