"""Tokenizers for the experiments: a hub id, a local tokenizer directory, a byte-level BPE trained here, or
the word-per-id tokenizer of the synthetic token-id corpora.

`bpe:SIZE` trains a RoBERTa-style byte-level BPE (special tokens <s> <pad> </s> <unk> <mask> = ids 0..4,
<s> ... </s> added around every sequence) so everything runs offline; it is saved with `save_pretrained`
and loads back with `AutoTokenizer.from_pretrained(directory)`. `words:SIZE` maps the word `w<i>` to id i
(same special tokens and ids): with the texts of `dtype_bench.synthetic.token_id_texts` it turns generated
token ids back into exactly those ids, so a model of a real tokenizer's vocabulary size (roberta-base's
50,265, GPT-2's 50,257) trains offline with no tokenizer download.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, ByteLevelBPETokenizer, Tokenizer, models, pre_tokenizers
from tokenizers.processors import RobertaProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dtype_bench import synthetic

# RoBERTa's special tokens, in id order 0..4.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BPE_PREFIX = "bpe:"
WORDS_PREFIX = "words:"
# 256 byte symbols plus the special tokens must fit, with room for some merges.
MIN_BPE_VOCAB_SIZE = 300


class TokenizerError(ValueError):
    """The tokenizer spec cannot be turned into a tokenizer; the message says what to pass instead."""


def parse_bpe_spec(spec: str) -> int | None:
    """The vocabulary size of a `bpe:SIZE` spec, None for any other spec."""
    if not spec.startswith(BPE_PREFIX):
        return None
    size = spec[len(BPE_PREFIX):]
    if not size.isdigit() or int(size) < MIN_BPE_VOCAB_SIZE:
        raise TokenizerError(f"tokenizer spec {spec!r}: expected bpe:SIZE with an integer SIZE >= {MIN_BPE_VOCAB_SIZE}")
    return int(size)


def parse_words_spec(spec: str) -> int | None:
    """The vocabulary size of a `words:SIZE` spec, None for any other spec."""
    if not spec.startswith(WORDS_PREFIX):
        return None
    size = spec[len(WORDS_PREFIX):]
    if not size.isdigit() or int(size) <= len(SPECIAL_TOKENS):
        raise TokenizerError(f"tokenizer spec {spec!r}: expected words:SIZE with an integer SIZE > "
                             f"{len(SPECIAL_TOKENS)}")
    return int(size)


def words_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """`words:SIZE`: the special tokens at ids 0..4, then word `w<i>` at id i up to vocab_size - 1, words split
    on whitespace, <s> ... </s> around every sequence as RoBERTa does; any other word is <unk>."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({synthetic.ID_WORD.format(i): i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it to `out_dir`; the same texts give the same tokenizer."""
    bpe = ByteLevelBPETokenizer()  # RoBERTa defaults: no prefix space, offsets trimmed
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,  # the wrapped `tokenizers.Tokenizer`; the wrapper has no public accessor
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
        # As in RoBERTa: "<mask>" absorbs the space before it, so "a <mask>" masks the word " x".
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(
    spec: str, train_texts: Iterable[str] | None = None, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """A fast tokenizer from `spec`: `bpe:SIZE` (trained on `train_texts`, saved to `out_dir`), `words:SIZE`
    (built here), a local tokenizer directory, or a Hugging Face hub id. With `out_dir`, a loaded tokenizer is
    saved there too."""
    vocab_size = parse_bpe_spec(spec)
    if vocab_size is not None:
        if train_texts is None or out_dir is None:
            raise TokenizerError(f"tokenizer {spec!r} is trained here: it needs train_texts and out_dir")
        return train_bpe_tokenizer(train_texts, vocab_size, out_dir)
    words_vocab_size = parse_words_spec(spec)
    try:
        tokenizer = words_tokenizer(words_vocab_size) if words_vocab_size else AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        where = "local directory" if Path(spec).is_dir() else "Hugging Face hub id"
        raise TokenizerError(
            f"cannot load tokenizer {spec!r} as a {where} ({type(e).__name__}); offline (HF_HUB_OFFLINE=1 reads "
            f"only the local hub cache), pass a local tokenizer directory or {BPE_PREFIX}SIZE (e.g. "
            f"{BPE_PREFIX}8000); a directory written by AutoTokenizer.from_pretrained('{spec}').save_pretrained(DIR) "
            "where the hub can be reached is one"
        ) from e
    if not tokenizer.is_fast:
        raise TokenizerError(f"tokenizer {spec!r} has no fast (Rust) implementation; pass one that has tokenizer.json")
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """Hash of what decides token ids: the full tokenizer.json (vocab, merges, normalisation, special-token
    handling) plus which tokens play the special roles."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    for role, token in sorted(tokenizer.special_tokens_map.items()):
        h.update(f"\0{role}={token}".encode())
    return h.hexdigest()[:16]


def bpe_identity(vocab_size: int) -> dict:
    """What determines a `bpe:SIZE` tokenizer besides its training texts (for cache fingerprints taken
    before training): the size, and the library version whose trainer produces it."""
    return {"bpe_vocab_size": vocab_size, "tokenizers_version": tokenizers.__version__}
