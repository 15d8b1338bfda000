"""The DenseLoRA layer: a frozen linear layer plus act(W_d M act(W_e h)), W_e and W_d held by the tuner."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import transpose
from transformers.pytorch_utils import Conv1D

from .branch import dense_branch
from .config import DenseLoraConfig


class SharedProjections(NamedTuple):
    """The tuner's containers of shared weights: adapter name -> share key -> W_e (r x in) or W_d (out x r).

    A layer keeps this tuple, not the containers as submodules: a registered submodule would put a copy of every
    shared weight into each layer's state_dict and let PEFT's dtype casts give each layer its own copy.
    """

    encoder: nn.ModuleDict
    decoder: nn.ModuleDict

    def weights(self, adapter_name: str, share_key: str) -> tuple[nn.Parameter, nn.Parameter]:
        return self.encoder[adapter_name][share_key], self.decoder[adapter_name][share_key]


def linear_sizes(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in, out) of a layer DenseLoRA can adapt: an nn.Linear, or transformers' Conv1D (GPT-2's, weight in x out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return None


def kaiming_uniform_(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (Kaiming-uniform, a = sqrt 5), the one the paper uses for W_e and M."""
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class MergeError(ValueError):
    """Raised when asked to merge a DenseLoRA variant whose update is not a weight matrix."""


def merge_error(variant: str) -> MergeError:
    return MergeError(
        f"cannot merge a DenseLoRA adapter of variant {variant!r}: a GELU sits between W_e, M and W_d, so the "
        "update depends on the input and no weight matrix Delta W exists to add to W0. Only variant 'only_matrix' "
        "(no activation, Delta W = alpha/r * W_d M W_e) can be merged; keep this adapter unmerged."
    )


class DenseLoraLayer(BaseTunerLayer):
    adapter_layer_names = ("denselora_M",)
    other_param_names = ("r", "scaling", "variant", "share_key", "denselora_dropout")

    def __init__(self, base_layer: nn.Module, shared: SharedProjections, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.shared = shared
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.variant: dict[str, str] = {}
        self.share_key: dict[str, str] = {}
        self.denselora_dropout: dict[str, float] = {}
        self.denselora_M = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        self.in_features, self.out_features = linear_sizes(base)
        # The branch never reads W0; only merging must add Delta W in W0's layout, (in, out) for a Conv1D.
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, share_key: str, config: DenseLoraConfig) -> None:
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = config.scaling
        self.variant[adapter_name] = config.variant
        self.share_key[adapter_name] = share_key
        self.denselora_dropout[adapter_name] = config.lora_dropout
        m = torch.empty(config.r, config.r)
        # "freeze" keeps W_d random and frozen, so M must start at zero for the adapter to start as a no-op.
        if config.variant == "freeze" and config.init_weights:
            nn.init.zeros_(m)
        else:
            kaiming_uniform_(m)
        self.denselora_M[adapter_name] = nn.Parameter(m)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """(alpha / r) * drop(act(W_d M drop(act(W_e drop(x))))), in the adapter's (or autocast's) dtype."""
        w_e, w_d = self.shared.weights(adapter_name, self.share_key[adapter_name])
        m = self.denselora_M[adapter_name]
        dropout = self.denselora_dropout[adapter_name] if self.training else 0.0
        activate = self.variant[adapter_name] != "only_matrix"
        x = self._cast_input_dtype(x, m.dtype)
        return dense_branch(x, w_e, m, w_d, self.scaling[adapter_name], dropout, activate)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Delta W = (alpha / r) W_d M W_e in the base weight's layout (out x in, a Conv1D's in x out); exists only for
        the activation-free variant."""
        if self.variant[adapter_name] != "only_matrix":
            raise merge_error(self.variant[adapter_name])
        w_e, w_d = self.shared.weights(adapter_name, self.share_key[adapter_name])
        m = self.denselora_M[adapter_name]
        # bf16/fp16 matmuls are slow or missing on CPU: compute in fp32 there, as PEFT's own layers do.
        compute_dtype = torch.float32 if m.device.type == "cpu" else m.dtype
        delta = w_d.to(compute_dtype) @ m.to(compute_dtype) @ w_e.to(compute_dtype)
        return transpose(delta * self.scaling[adapter_name], self.fan_in_fan_out).to(m.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name in self.denselora_M and self.variant[name] != "only_matrix":
                raise merge_error(self.variant[name])
        for name in adapter_names:
            if name not in self.denselora_M:
                continue
            base = self.get_base_layer()
            merged = base.weight.data + self.get_delta_weight(name).to(base.weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {name!r} seems broken")
            base.weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.denselora_M:
                base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)


class Linear(nn.Module, DenseLoraLayer):
    """An nn.Linear (or a Conv1D) adapted by DenseLoRA."""

    def __init__(
        self, base_layer: nn.Module, shared: SharedProjections, adapter_name: str, share_key: str,
        config: DenseLoraConfig, **kwargs: Any,
    ) -> None:
        super().__init__()
        DenseLoraLayer.__init__(self, base_layer, shared, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, share_key, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.denselora_M:
                result = result + self.adapter_output(x, name).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "denselora." + super().__repr__()
