"""Dropout's draw: the positions it drops on a CPU, a mask on a GPU.

nn.Dropout draws one random number per element. On a CPU that draw is most of dropout's cost (8 ms for a
1024 x 1536 tensor on the machine this was written on, against 0.3 ms for a GELU over it), and the mask it keeps
for backward is a float per element there. With a small p almost every element is kept, so on a CPU this module draws
the gaps between dropped elements instead: for i.i.d. Bernoulli(p) drops, the number of kept elements before each drop
is geometric, P(gap >= g) = (1 - p)^g, and the gaps are independent. That is the same distribution as nn.Dropout's
mask, drawn with about n * p random numbers instead of n, and kept as about n * p indices.

How many gaps cover n elements is known only once they are drawn, so that path reads values back to the host (the last
position, where to cut): on a GPU each read waits for the stream, twice per draw and three draws per adapted layer and
call, about 900 waits per forward of a 30-layer model. A GPU draws a number per element at no cost that matters, so
there (and on any device but the CPU) dropout draws a boolean mask instead, with the same Bernoulli(p) law, a fixed
shape and no value read back: a byte per element kept for backward, as nn.Dropout keeps on a GPU. On a CPU that mask
made the branch's forward and backward about twice as slow as the positions did. `draw_drops` picks the path by
device and `zero_at` applies either.
"""

from __future__ import annotations

import math

import torch

# Gaps are drawn in batches sized to cover n elements with this many standard deviations to spare, so a second batch
# is almost never needed (but is drawn when it is: the positions are exact, not truncated).
_SPARE_DEVIATIONS = 8.0


def uses_mask(device: torch.device) -> bool:
    """Whether dropout on `device` draws a mask rather than positions: everywhere but the CPU, whose path syncs."""
    return device.type != "cpu"


def draw_drops(numel: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The elements that dropout with probability p zeroes among numel, in the form `device` draws fastest.

    Sorted flat positions (int64, `drop_positions`) on a CPU, a flat boolean mask (`drop_mask`) elsewhere; `zero_at`
    applies either. Empty when nothing can be dropped.
    """
    device = torch.device(device)
    return drop_mask(numel, p, device) if uses_mask(device) else drop_positions(numel, p, device)


def drop_positions(numel: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted flat indices (int64) of the elements that dropout with probability p zeroes among numel elements.

    Draws from torch's default generator of `device`, so torch.manual_seed and gradient checkpointing's RNG
    restore reproduce it. Reads values back to the host: meant for CPU tensors.
    """
    _check_probability(p)
    if p == 0.0 or numel == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    mean = numel * p
    batch = int(mean + _SPARE_DEVIATIONS * math.sqrt(mean * (1.0 - p))) + 16
    log_keep = math.log1p(-p)
    batches, start = [], 0
    while start < numel:
        uniform = torch.rand(batch, dtype=torch.float64, device=device)  # [0, 1): log1p(-u) is finite
        # Kept elements before each drop, floor(log(1 - u) / log(1 - p)): non-negative, so truncation is the floor.
        gaps = uniform.neg_().log1p_().mul_(1.0 / log_keep).to(torch.int64)
        positions = gaps.add_(1).cumsum_(0).add_(start - 1)
        batches.append(positions)
        start = int(positions[-1]) + 1
    positions = batches[0] if len(batches) == 1 else torch.cat(batches)
    return positions[: int(torch.searchsorted(positions, numel))]


def drop_mask(numel: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A flat boolean mask of numel elements, True where dropout with probability p zeroes; empty when p is 0.

    Draws from torch's default generator of `device` (reproduced as `drop_positions` is) and reads nothing back to
    the host, so a GPU's stream runs on.
    """
    _check_probability(p)
    if p == 0.0:
        # An empty mask drops nothing: zero_at and the branch then skip their fill, and no random number is drawn.
        return torch.empty(0, dtype=torch.bool, device=device)
    # Drawn straight into bool, with no float per element in between.
    return torch.empty(numel, dtype=torch.bool, device=device).bernoulli_(p)


def zero_at(tensor: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """Zero a contiguous tensor's elements at `drops` from `draw_drops` (positions or mask), in place; returns it."""
    if drops.numel():
        flat = tensor.view(-1)
        if drops.dtype == torch.bool:
            flat.masked_fill_(drops, 0)
        else:
            flat.index_fill_(0, drops, 0)
    return tensor


def _check_probability(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
