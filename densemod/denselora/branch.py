"""DenseLoRA's adapter branch, scaling * drop(act(W_d M drop(act(W_e drop(x))))), as one autograd function.

Written out with autograd, the branch keeps for backward the decoder's output and dropout's mask (a float per element
on a CPU), both as wide as the layer's output (1,536 columns for SmolLM2's up_proj, 14,336 for LLaMA-3-8B's), where
LoRA keeps its dropped input and an r-wide tensor. This function keeps the input, three r-wide tensors and what
dropout drops, and recomputes the decoder's output in backward: one r-inner matmul, the size of LoRA's B. On a CPU
dropout draws only the positions it drops, on a GPU a boolean mask that needs no sync (`dropout.py`); its 1 / (1 - p)
goes into the encoder's weights, an r-wide tensor and the output's scaling.

It computes what the written-out branch computes, in the dtype autocast would give its matmuls (or M's dtype without
autocast); tests/test_denselora_branch.py holds it to that reference, outputs and gradients, in float32 and bfloat16.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .dropout import draw_drops, zero_at


def compute_dtype(x: torch.Tensor, m: torch.Tensor) -> torch.dtype:
    """The dtype the branch computes in: autocast's where it is on for x's device (as for F.linear), else M's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return m.dtype


def dense_branch(
    x: torch.Tensor, w_e: torch.Tensor, m: torch.Tensor, w_d: torch.Tensor, scaling: float, dropout: float,
    activate: bool,
) -> torch.Tensor:
    """scaling * drop(act(W_d M drop(act(W_e drop(x))))), act = GELU if `activate` else identity; x is (..., in).

    `dropout` is the drop probability (pass 0 in eval mode). Returns (..., out) in the compute dtype.
    """
    return DenseBranch.apply(x, w_e, m, w_d, scaling, dropout, activate, compute_dtype(x, m))


class DenseBranch(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, w_e: torch.Tensor, m: torch.Tensor, w_d: torch.Tensor, scaling: float,
        dropout: float, activate: bool, dtype: torch.dtype,
    ) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            rows = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
            keep = 1.0 / (1.0 - dropout)
            # The first dropout's 1 / (1 - p) goes into the encoder's weights (r x in, rounded once), not the input.
            encoder = (w_e * keep if dropout else w_e).to(dtype)
            m, w_d = m.to(dtype), w_d.to(dtype)
            n, k, r, d = rows.shape[0], rows.shape[1], m.shape[0], w_d.shape[0]
            dropped = [draw_drops(count, dropout, x.device) for count in (n * k, n * r, n * d)]

            encoded = F.linear(dropped_copy(rows, dropped[0]), encoder)
            hidden = F.gelu(encoded) if activate else encoded
            if dropout:
                hidden = zero_at(hidden * keep, dropped[1])
            mixed = F.linear(hidden, m)
            decoded = F.linear(mixed, w_d)
            out = F.gelu(decoded) if activate else decoded
            out = zero_at(out.mul_(scaling * keep), dropped[2])

        ctx.save_for_backward(rows, encoder, m, w_d, encoded if activate else None, hidden, mixed, *dropped)
        ctx.scaling, ctx.keep, ctx.activate, ctx.input_shape, ctx.w_e_dtype = scaling, keep, activate, x.shape, w_e.dtype
        return out.view(*x.shape[:-1], d)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        rows, encoder, m, w_d, encoded, hidden, mixed, dropped_in, dropped_hidden, dropped_out = ctx.saved_tensors
        needs_x, needs_w_e, needs_m, needs_w_d = ctx.needs_input_grad[:4]
        keep = ctx.keep
        with torch.autocast(rows.device.type, enabled=False):
            grad = zero_at(grad_out.reshape(-1, w_d.shape[0]) * (ctx.scaling * keep), dropped_out).to(rows.dtype)
            if ctx.activate:
                grad = torch.ops.aten.gelu_backward(grad, F.linear(mixed, w_d))
            # Each product in the order autograd's linear uses (grad^T input for a weight), so that without dropout
            # every gradient equals the written-out branch's bit for bit.
            grad_w_d = grad_mm(mixed, grad) if needs_w_d else None
            grad = grad @ w_d
            grad_m = grad_mm(hidden, grad) if needs_m else None
            grad_w_e = grad_x = None
            if needs_x or needs_w_e:
                grad = grad @ m
                if keep != 1.0:
                    grad = zero_at(grad * keep, dropped_hidden)
                if ctx.activate:
                    grad = torch.ops.aten.gelu_backward(grad, encoded)
                if needs_w_e:
                    grad_w_e = grad_mm(dropped_copy(rows, dropped_in), grad).to(ctx.w_e_dtype)
                    if keep != 1.0:
                        grad_w_e.mul_(keep)
                if needs_x:
                    grad_x = zero_at(grad @ encoder, dropped_in).view(ctx.input_shape)
        return grad_x, grad_w_e, grad_m, grad_w_d, None, None, None, None


def dropped_copy(rows: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """rows with the elements at `drops` (positions or mask) zeroed, as a new tensor (rows itself when none are)."""
    return zero_at(rows.clone(), drops) if drops.numel() else rows


def grad_mm(inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of F.linear's weight, out x in."""
    return grad.t() @ inputs
