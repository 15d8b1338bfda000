"""The precision a trial trains and evaluates in.

bfloat16 here is mixed precision as torchtune and PEFT users run it: the frozen base weights are stored in bfloat16,
the adapter's weights and the optimizer's state stay in float32, and the forward and backward passes run under
bfloat16 autocast. It is chosen where the hardware computes bfloat16 natively: a CUDA GPU of compute capability 8 or
more, or a CPU with AMX or AVX-512 BF16 (measured ~2x faster than float32 on SmolLM2-135M, docs/PERFORMANCE.md).

float16 is the same with float16 autocast and a gradient scaler, whose scale keeps the small gradients of the backward
pass from flushing to zero in float16's narrow range: the mixed precision of GPUs without native bfloat16 (T4, V100),
where emulated bfloat16 is slower than float32. The frozen base weights are stored in float16 too, as PEFT documents
fp16 AMP (its troubleshooting guide: base loaded in float16, trainable weights upcast to float32, which PEFT's
autocast_adapter_dtype does for float16 as for bfloat16): it halves the base's memory on those 16 GB cards, and
autocast computes the linear layers in float16 from float32 weights anyway. Elsewhere 'auto' is float32.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

MIXED = ("bfloat16", "float16")


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        # By default torch counts emulated bf16 (T4, V100) as supported; there it is slower than float16.
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # torch's own CPU feature checks; private, so a torch without them counts as "no".
        return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


def resolve(setting: str, device: torch.device) -> str:
    """'auto' -> 'bfloat16' where the device computes it natively, else 'float16' on a CUDA GPU and 'float32'
    elsewhere; the others as they are."""
    if setting != "auto":
        return setting
    if native_bf16(device):
        return "bfloat16"
    return "float16" if device.type == "cuda" else "float32"


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype of the frozen base weights."""
    return getattr(torch, precision)


def autocast(precision: str, device: torch.device) -> ContextManager:
    if precision in MIXED:
        return torch.autocast(device.type, dtype=weights_dtype(precision))
    return contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """float16's gradient scaler; None in the other precisions, whose range needs none."""
    return torch.amp.GradScaler(device.type) if precision == "float16" else None
