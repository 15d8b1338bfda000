"""Which examples each step and each worker's micro-batches hold: length grouping, and the same global batches for
any number of workers."""

import numpy as np
import pytest
from torch.utils.data import DistributedSampler

from densetune.data.batching import epoch_batches, epoch_order, token_counts

LENGTHS = np.random.default_rng(0).integers(10, 200, size=1000)


def global_batches(lengths, batch_size, micro_batch_size, world, group_by_length=True, epoch=0, seed=42):
    """Each step's examples over all workers, as sorted lists."""
    per_worker = [
        epoch_batches(lengths, batch_size, micro_batch_size, epoch, seed, rank, world, group_by_length)
        for rank in range(world)
    ]
    return [sorted(np.concatenate([b for worker in step for b in worker]).tolist()) for step in zip(*per_worker)]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_one_two_and_four_workers_train_on_the_same_global_batches(group_by_length):
    one = global_batches(LENGTHS, 16, 4, 1, group_by_length)
    assert len(one) == 1000 // 16
    assert global_batches(LENGTHS, 16, 4, 2, group_by_length) == one
    assert global_batches(LENGTHS, 16, 4, 4, group_by_length) == one
    # and two workers with two micro-batches each hold the same micro-batches as one worker with four
    single = epoch_batches(LENGTHS, 16, 4, 0, 42, 0, 1, group_by_length)
    pair = [epoch_batches(LENGTHS, 16, 4, 0, 42, rank, 2, group_by_length) for rank in range(2)]
    for step, (first, second) in enumerate(zip(*pair)):
        assert [b.tolist() for b in single[step]] == [b.tolist() for pair_ in zip(first, second) for b in pair_]


def test_without_grouping_the_batches_are_those_of_torchs_distributed_sampler():
    sampler = DistributedSampler(range(1000), num_replicas=1, rank=0, shuffle=True, seed=42)
    sampler.set_epoch(3)
    shuffled = list(sampler)
    expected = [sorted(shuffled[s * 16:(s + 1) * 16]) for s in range(1000 // 16)]
    assert global_batches(LENGTHS, 16, 4, 2, group_by_length=False, epoch=3) == expected


def test_grouping_keeps_every_example_once_per_epoch_and_shuffles_between_epochs():
    first, second = (epoch_order(LENGTHS, 16, epoch, 42, True) for epoch in (0, 1))
    assert len(first) == 1000 // 16 * 16 == len(set(first.tolist()))
    assert not np.array_equal(first, second)
    assert np.array_equal(first, epoch_order(LENGTHS, 16, 0, 42, True))  # deterministic: resume finds its place


def padded_fraction(lengths, steps):
    tokens, slots = np.sum([token_counts(lengths, step) for step in steps], axis=0)
    return 1 - tokens / slots


def test_grouping_by_length_removes_most_padding():
    shuffled = padded_fraction(LENGTHS, epoch_batches(LENGTHS, 16, 4, 0, 42, 0, 1, False))
    grouped = padded_fraction(LENGTHS, epoch_batches(LENGTHS, 16, 4, 0, 42, 0, 1, True))
    assert shuffled > 0.3  # uniform lengths 10..200: a micro-batch of 4 pads to its longest
    assert grouped < 0.02


def test_each_global_batch_is_sorted_longest_first_and_the_longest_batch_comes_first():
    order = epoch_order(LENGTHS, 16, 0, 42, True).reshape(-1, 16)
    assert all((np.diff(LENGTHS[batch]) <= 0).all() for batch in order)
    assert LENGTHS[order[0]].max() == LENGTHS.max()


def test_token_counts_by_hand():
    lengths = np.array([5, 3, 7, 7])
    # [5, 3] pads to 2 x 5; [7, 7] needs no pad
    assert token_counts(lengths, [np.array([0, 1]), np.array([2, 3])]) == (22, 24)


def test_fewer_examples_than_a_batch_give_no_step():
    assert epoch_batches(np.array([3, 4, 5]), 4, 2, 0, 0, 0, 1) == []
