"""The precision a trial trains and evaluates in.

bfloat16 here is mixed precision as torchtune and PEFT users run it: the frozen base weights are stored in bfloat16,
the adapter's weights and the optimizer's state stay in float32, and the forward and backward passes run under
bfloat16 autocast. It is chosen where the hardware computes bfloat16 natively: a CUDA GPU with bf16 support, or a
CPU with AMX or AVX-512 BF16 (measured ~2x faster than float32 on SmolLM2-135M, docs/PERFORMANCE.md); float32
elsewhere, where bfloat16 would be emulated and slower.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # torch's own CPU feature checks; private, so a torch without them counts as "no".
        return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


def resolve(setting: str, device: torch.device) -> str:
    """'auto' -> 'bfloat16' where the device computes it natively, else 'float32'; the others as they are."""
    if setting == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return setting


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype of the frozen base weights."""
    return getattr(torch, precision)


def autocast(precision: str, device: torch.device) -> ContextManager:
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
