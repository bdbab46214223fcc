"""Training order and batches of the classification experiment: shuffled, optionally length-grouped, resumable."""
from __future__ import annotations


import numpy as np
import pytest


from experiments.classification import data

# EUR-Lex-like spread: many short documents, a long tail cut at max_length.
LENGTHS = np.random.default_rng(0).lognormal(mean=6.0, sigma=0.9, size=1003).astype(np.int64) + 3
MAX_LENGTH = 512


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> data.TokenizedSplit:
    """A train split in the cache's array format with LENGTHS tokens per document and one label each."""
    directory = tmp_path_factory.mktemp("cache")
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)])
    arrays = {"input_ids": np.arange(offsets[-1], dtype=np.int32) % 1000 + 3, "doc_offsets": offsets,
              "label_ids": (np.arange(len(LENGTHS)) % 20).astype(np.int32),
              "label_offsets": np.arange(len(LENGTHS) + 1, dtype=np.int64),
              "n_unseen_labels": np.zeros(len(LENGTHS), dtype=np.int32)}
    for name, array in arrays.items():
        np.save(directory / f"train.{name}.npy", array)
    return data.TokenizedSplit(directory, "train", MAX_LENGTH)


def padding_of(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> float:
    batches = lengths[order].reshape(-1, batch_size)
    return 1 - batches.sum() / (batches.max(axis=1).sum() * batch_size)


def test_served_lengths_are_truncated_lengths(split):
    assert np.array_equal(split.lengths(), np.minimum(LENGTHS, MAX_LENGTH))
    assert all(len(split.tokens(i)) == split.lengths()[i] for i in (0, int(np.argmax(LENGTHS)), 1002))


def test_default_order_is_the_seeded_shuffle_cut_to_whole_micro_batches():
    order = data.training_order(LENGTHS, 8, seed=3, epoch=2, length_grouped=False)
    assert len(order) == 1000  # 1003 documents: the 3 left after the last whole micro-batch are dropped
    assert np.array_equal(order, data.epoch_order(1003, 3, 2)[:1000])


@pytest.mark.parametrize("epoch", [0, 1])
def test_length_grouped_order_keeps_the_epochs_documents_and_pads_less(epoch):
    lengths = np.minimum(LENGTHS, MAX_LENGTH)
    plain = data.training_order(lengths, 8, seed=3, epoch=epoch, length_grouped=False)
    grouped = data.training_order(lengths, 8, seed=3, epoch=epoch, length_grouped=True)
    assert sorted(grouped) == sorted(plain)  # the same documents, each once
    assert padding_of(grouped, lengths, 8) < padding_of(plain, lengths, 8) / 3
    assert lengths[grouped[0]] == lengths.max()  # the widest micro-batch comes first
    assert np.array_equal(grouped, data.training_order(lengths, 8, seed=3, epoch=epoch, length_grouped=True))


def test_length_grouped_batches_are_shuffled_across_windows_and_epochs():
    lengths = np.minimum(LENGTHS, MAX_LENGTH)
    epochs = [data.training_order(lengths, 8, seed=3, epoch=e, length_grouped=True).reshape(-1, 8) for e in (0, 1)]
    assert {tuple(b) for b in epochs[0]} != {tuple(b) for b in epochs[1]}
    widths = lengths[epochs[0]].max(axis=1)
    assert not (np.all(np.diff(widths[1:]) <= 0) or np.all(np.diff(widths[1:]) >= 0))  # not globally sorted
    window = data.LENGTH_GROUP_WINDOW * 8
    plain = data.training_order(lengths, 8, seed=3, epoch=0, length_grouped=False)
    first_window = set(plain[:window])
    positions = [i for i, b in enumerate(epochs[0]) if first_window.issuperset(b)]
    assert len(positions) == data.LENGTH_GROUP_WINDOW and max(positions) > 2 * data.LENGTH_GROUP_WINDOW


@pytest.mark.parametrize("length_grouped", [False, True])
def test_resuming_at_a_position_continues_the_same_stream_and_padding_count(split, length_grouped):
    make = lambda: data.TrainBatches(split, 8, 5, 20, 1, length_grouped=length_grouped)  # noqa: E731
    first = make()
    for _ in range(100):  # 125 micro-batches per epoch: the resume point and the rest cross epoch 0's end
        next(first)
    position = dict(first.position)
    expected = [next(first).input_ids for _ in range(60)]
    resumed = make()
    resumed.seek(position)
    assert all((next(resumed).input_ids == ids).all() for ids in expected)
    assert resumed.position == first.position and resumed.epoch == 1
    assert resumed.padding_fraction == first.padding_fraction


def test_padding_fraction_counts_the_served_micro_batches(split):
    batches = data.TrainBatches(split, 8, 5, 20, 1)
    served = [next(batches) for _ in range(10)]
    real = sum(int(b.attention_mask.sum()) for b in served)
    computed = sum(b.attention_mask.numel() for b in served)
    assert batches.padding_fraction == pytest.approx(1 - real / computed)
    grouped = data.TrainBatches(split, 8, 5, 20, 1, length_grouped=True)
    for _ in range(125):
        next(grouped)
    assert grouped.padding_fraction < 0.1 < batches.padding_fraction
