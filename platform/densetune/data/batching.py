"""Which training examples make up each optimizer step, and which of them each worker's micro-batches hold.

Grouping by length (transformers' `group_by_length`): the epoch is shuffled, cut into mega-batches of 50 global
batches, and each mega-batch is sorted by length, so a global batch holds examples of similar length; within it, the
micro-batches are cut from the examples sorted by length. Padding then costs little compute, and the batches stay
random at the scale of an epoch.

Step s of an epoch covers the same examples whatever the number of workers: the global batch is fixed first, and its
micro-batches are then dealt out to the workers in turn.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

MEGA_BATCHES = 50  # global batches per length-sorted group, as in transformers' LengthGroupedSampler


def epoch_order(lengths: np.ndarray, batch_size: int, epoch: int, seed: int, group_by_length: bool) -> np.ndarray:
    """The epoch's examples in step order: positions into `lengths`, a multiple of batch_size of them."""
    generator = torch.Generator().manual_seed(seed + epoch)  # the shuffle of torch's DistributedSampler
    order = torch.randperm(len(lengths), generator=generator).numpy()
    order = order[: len(order) // batch_size * batch_size]
    if not group_by_length or len(order) == 0:
        return order
    mega = batch_size * max(1, min(MEGA_BATCHES, len(order) // (batch_size * 4)))
    order = np.concatenate([
        chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.split(order, range(mega, len(order), mega))
    ])
    # The longest batch first: a batch that does not fit in memory fails at the first step, not hours in.
    batches = order.reshape(-1, batch_size)
    longest = int(np.argmax(lengths[batches].max(axis=1)))
    batches[[0, longest]] = batches[[longest, 0]]
    return batches.reshape(-1)


def epoch_batches(
    lengths: np.ndarray, batch_size: int, micro_batch_size: int, epoch: int, seed: int, rank: int, world: int,
    group_by_length: bool = True,
) -> list[list[np.ndarray]]:
    """This worker's micro-batches (positions into `lengths`) for every optimizer step of one epoch."""
    # Grouped, every global batch is already sorted by length, so consecutive micro-batches are of similar length.
    micro_batches = epoch_order(lengths, batch_size, epoch, seed, group_by_length).reshape(-1, micro_batch_size)
    per_step = batch_size // micro_batch_size
    return [list(micro_batches[start:start + per_step][rank::world]) for start in range(0, len(micro_batches), per_step)]


class TokenCounts(NamedTuple):
    tokens: int  # real tokens
    slots: int  # token slots, padding included


def token_counts(lengths: np.ndarray, micro_batches: list[np.ndarray]) -> TokenCounts:
    """Real tokens and token slots of some micro-batches, each padded to its longest example."""
    return TokenCounts(
        tokens=sum(int(lengths[batch].sum()) for batch in micro_batches),
        slots=sum(len(batch) * int(lengths[batch].max()) for batch in micro_batches),
    )
