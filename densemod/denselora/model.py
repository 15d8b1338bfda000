"""The DenseLoRA tuner: injects DenseLoRA layers (and, for a hybrid, PEFT's LoRA layers on the kinds lora_modules
names) and holds the shared encoders and decoders once.

Why a hybrid lives in this tuner (checked against peft 0.21.2): PeftModel.add_adapter refuses adapters of a second
PEFT type ("Cannot combine adapters with different peft types"), and PeftMixedModel admits only the types of its closed
COMPATIBLE_TUNER_TYPES, dispatches layer creation on a hard-coded list of config classes, has no tuner of DenseLoRA's
to hold the shared W_e, W_d, and refuses save_pretrained. Here LoRA's layers are PEFT's own lora.Linear, built from a
LoraConfig; PEFT saves, loads, casts, disables and trains a tuner's layers by visiting them, whatever their class, so
one DENSELORA adapter holding both kinds keeps get_peft_model, save_pretrained, PeftModel.from_pretrained and
disable_adapter as they are.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from peft.config import PeftConfig
from peft.tuners.tuners_utils import (
    BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers, check_target_module_exists,
)
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers.pytorch_utils import Conv1D

from .config import DenseLoraConfig, matches_name
from .layer import DenseLoraLayer, Linear, SharedProjections, kaiming_uniform_, linear_sizes, merge_error

# The paper adapts q, k, v, up and down; for LLaMA-style families that is the default when no targets are given.
_PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
TARGET_MODULES_MAPPING = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    **{family: _PAPER_TARGETS for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2")},
}
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)


def module_kind(module_key: str) -> str:
    """The module kind of an adapted layer: its attribute name (all `q_proj` layers are one kind)."""
    return module_key.rpartition(".")[2]


class DenseLoraModel(BaseTuner):
    """Creates a DenseLoRA model from a pretrained model; use it through `peft.get_peft_model`.

    Shared weights live here, in `denselora_encoder` and `denselora_decoder` (adapter name -> share key ->
    Parameter), so they are counted, saved, cast and moved exactly once. Each layer holds its own M. Disabling and
    enabling the adapters (`with model.disable_adapter():`) changes the forward pass only, never what trains.
    """

    uses_shared_state: bool = True
    prefix: str = "denselora_"
    # A hybrid's LoRA layers are this tuner's layers too: PEFT uses tuner_layer_cls only in isinstance checks
    # (set_adapter, delete_adapter, freezing), which take a tuple.
    tuner_layer_cls = (DenseLoraLayer, LoraLayer)
    target_module_mapping = TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: DenseLoraConfig, adapter_name: str) -> None:
        # Runs once, before the first adapter; adapters added or loaded later put their entries in these.
        self.denselora_encoder = nn.ModuleDict()
        self.denselora_decoder = nn.ModuleDict()

    @property
    def shared(self) -> SharedProjections:
        return SharedProjections(self.denselora_encoder, self.denselora_decoder)

    def _prepare_model(self, peft_config: DenseLoraConfig, model: nn.Module) -> None:
        # Runs before any module is replaced: a bad target fails here with the model untouched.
        check_targets(peft_config, model)
        layers = targeted_layers(model, peft_config)
        check_lora_targets(peft_config, layers)
        dense_layers = [(key, base) for key, base in layers if not peft_config.adapts_with_lora(key)]
        check_kind_shapes(peft_config, dense_layers)
        warn_of_capped_ranks(peft_config, dense_layers)
        super()._prepare_model(peft_config, model)

    def _create_and_replace(
        self, config: DenseLoraConfig, adapter_name: str, target: nn.Module, target_name: str,
        parent: nn.Module, current_key: str, **kwargs: Any,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if linear_sizes(base) is None:
            raise TypeError(
                f"DenseLoRA adapts nn.Linear (or Conv1D) layers only; target {current_key!r} is a {type(base).__name__}"
            )
        fit_fan_in_fan_out(config, current_key, base)
        lora = config.adapts_with_lora(current_key)
        # Each layer class hosts adapters of its own kind only: a layer adapted by one kind cannot take the other.
        if isinstance(target, BaseTunerLayer) and not isinstance(target, LoraLayer if lora else DenseLoraLayer):
            wanted, held = ("LoRA", "DenseLoRA") if lora else ("DenseLoRA", "LoRA")
            raise ValueError(
                f"layer {current_key!r} holds {held} adapters {sorted(target.r)}; adapter {adapter_name!r} cannot "
                f"put {wanted} on it: a layer holds adapters of one kind"
            )
        if lora:
            layer = self._lora_layer(config, adapter_name, target)
        else:
            layer = self._denselora_layer(config, adapter_name, target, current_key, base)
        if layer is target:  # an adapted layer took the adapter in place
            return
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)
        self._replace_module(parent, target_name, layer, target)

    def _denselora_layer(
        self, config: DenseLoraConfig, adapter_name: str, target: nn.Module, current_key: str, base: nn.Module
    ) -> nn.Module:
        share_key = module_kind(current_key) if config.share_scope == "kind" else current_key.replace(".", "__")
        self._ensure_shared(config, adapter_name, share_key, base)
        if isinstance(target, DenseLoraLayer):
            target.update_layer(adapter_name, share_key, config)
            return target
        return Linear(target, self.shared, adapter_name, share_key, config)

    @staticmethod
    def _lora_layer(config: DenseLoraConfig, adapter_name: str, target: nn.Module) -> nn.Module:
        """A layer that lora_modules names gets PEFT's own LoRA layer, as LoraModel builds it for a linear layer."""
        lora_config = config.lora_config()
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, config.r, lora_alpha=config.lora_alpha, config=lora_config)
            return target
        return LoraLinear(
            target, adapter_name, config=lora_config, r=config.r, lora_alpha=config.lora_alpha,
            is_target_conv_1d_layer=isinstance(target, Conv1D),
        )

    def _ensure_shared(self, config: DenseLoraConfig, adapter_name: str, share_key: str, base: nn.Module) -> None:
        """Create W_e (r x in) and W_d (out x r) for this adapter and share key, unless an earlier layer did.

        check_kind_shapes has made sure that all layers of one share key have the same shape.
        """
        r, (k, d) = config.r, linear_sizes(base)
        for container in self.shared:
            if adapter_name not in container:
                container[adapter_name] = nn.ParameterDict()
        encoders, decoders = self.denselora_encoder[adapter_name], self.denselora_decoder[adapter_name]
        if share_key in encoders:
            return
        w_e, w_d = torch.empty(r, k), torch.empty(d, r)
        kaiming_uniform_(w_e)
        # W_d starts at zero so the adapter starts as a no-op, except in "freeze", where W_d never trains and
        # M starts at zero instead.
        if config.init_weights and config.variant != "freeze":
            nn.init.zeros_(w_d)
        else:
            kaiming_uniform_(w_d)
        weight = base.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        for container, value in ((encoders, w_e), (decoders, w_d)):
            container[share_key] = nn.Parameter(value.to(weight.device, dtype=dtype))

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for container in self.shared:
            params = container[adapter_name] if adapter_name in container else {}
            for key, param in params.items():
                if param.dtype in _UPCAST_DTYPES:
                    params[key] = nn.Parameter(param.detach().float(), requires_grad=param.requires_grad)

    def _shared_requires_grad(self, adapter_name: str, requires_grad: bool) -> None:
        trainable = requires_grad and self.peft_config[adapter_name].trains_projections
        for container in self.shared:
            if adapter_name in container:
                container[adapter_name].requires_grad_(trainable)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = {adapter_name} if isinstance(adapter_name, str) else set(adapter_name)
        for name in self.peft_config:
            self._shared_requires_grad(name, name in active and not inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            self._shared_requires_grad(name, requires_grad)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        # PEFT's layers and its ModulesToSaveWrapper set requires_grad when toggled: off when disabled, on for every
        # active adapter when enabled again. That would make an adapter loaded for inference trainable (its M and its
        # saved modules) after `with model.disable_adapter():`, and freeze a trainable one's M, but not the shared
        # W_e, W_d held here, inside it. Disabling changes the forward pass only, so every flag is kept as it was.
        flags = [(param, param.requires_grad) for param in self.parameters()]
        super()._enable_adapter_layers(enabled)
        for param, requires_grad in flags:
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for container in self.shared:
            if adapter_name in container:
                del container[adapter_name]

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        for name in self.active_adapters:
            variant = self.peft_config[name].variant
            if variant != "only_matrix":
                raise merge_error(variant)


def fit_fan_in_fan_out(config: DenseLoraConfig, key: str, base: nn.Module) -> None:
    """As LoRA does: a fan_in_fan_out that contradicts the target's weight layout is corrected, with a warning."""
    fits = isinstance(base, Conv1D)
    if config.fan_in_fan_out != fits:
        layout = "(in, out)" if fits else "(out, in)"
        warnings.warn(
            f"fan_in_fan_out={config.fan_in_fan_out} but target {key!r} is a {type(base).__name__}, whose weight is "
            f"stored {layout}; setting fan_in_fan_out={fits}"
        )
        config.fan_in_fan_out = fits


def outer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(key, module) of the model's modules, a layer adapted already by its base layer and nothing inside it (its
    base_layer, LoRA's lora_A and lora_B)."""
    modules, adapted = [], []
    for key, module in model.named_modules():
        if any(key.startswith(prefix) for prefix in adapted):
            continue
        if isinstance(module, BaseTunerLayer):
            adapted.append(f"{key}.")
            module = module.get_base_layer()
        modules.append((key, module))
    return modules


def targeted_layers(model: nn.Module, config: PeftConfig) -> list[tuple[str, nn.Module]]:
    """(key, base layer) of every layer DenseLoRA can adapt that `config` targets, matched as PEFT matches them; a
    layer adapted already counts by its base layer, and nothing inside it is a target."""
    config = _maybe_include_all_linear_layers(copy.deepcopy(config), model)
    return [
        (key, base) for key, base in outer_modules(model)
        if linear_sizes(base) is not None and check_target_module_exists(config, key)
    ]


def check_kind_shapes(config: DenseLoraConfig, dense_layers: list[tuple[str, nn.Module]]) -> None:
    """With share_scope 'kind', fail before any module is replaced if the layers of a kind differ in shape."""
    if config.share_scope != "kind":
        return
    first_sizes: dict[str, tuple[int, int]] = {}
    for key, base in dense_layers:
        kind, (k, d) = module_kind(key), linear_sizes(base)
        have_k, have_d = first_sizes.setdefault(kind, (k, d))
        if (have_k, have_d) != (k, d):
            raise ValueError(
                f"layers of kind {kind!r} differ in shape (in {have_k}, out {have_d} vs in {k}, out {d}), so "
                "they cannot share one encoder and decoder; use share_scope='layer'"
            )


def warn_of_capped_ranks(config: DenseLoraConfig, dense_layers: list[tuple[str, nn.Module]]) -> None:
    """One warning for an adapter whose r exceeds the input or output size of some kinds it adapts: their updates
    cannot have rank r there (a tiny test model with the paper's ranks, or r above a narrow k/v projection)."""
    capped: dict[str, tuple[int, int]] = {}
    for key, base in dense_layers:
        k, d = linear_sizes(base)
        if config.r > min(k, d):
            capped.setdefault(module_kind(key), (k, d))
    if capped:
        kinds = ", ".join(f"{kind} (in {k}, out {d}: at most {min(k, d)})" for kind, (k, d) in sorted(capped.items()))
        warnings.warn(f"DenseLoRA r={config.r} is larger than a size of {kinds}: their updates cannot have rank {config.r}")


def check_targets(config: DenseLoraConfig, model: nn.Module) -> None:
    """Fail with one clear line when a target name matches no module, or matches one that is not linear."""
    targets = config.target_modules
    if targets is None or targets == "all-linear":
        return
    modules = [(key, m) for key, m in outer_modules(model) if key]
    linear_names = sorted({module_kind(key) for key, m in modules if linear_sizes(m) is not None})
    if isinstance(targets, str):
        matches = {targets: [(key, m) for key, m in modules if re.fullmatch(targets, key)]}
    else:
        matches = {
            name: [(key, m) for key, m in modules if key == name or key.endswith(f".{name}")]
            for name in sorted(targets)
        }
    for name, matched in matches.items():
        if not matched:
            raise ValueError(
                f"target module {name!r} matches no module of the model; its linear modules are named {linear_names}"
            )
        for key, module in matched:
            if linear_sizes(module) is None:
                raise ValueError(
                    f"target module {name!r} matches {key!r}, a {type(module).__name__}; DenseLoRA adapts nn.Linear "
                    f"layers only (or GPT-2's Conv1D), named {linear_names}"
                )


def check_lora_targets(config: DenseLoraConfig, layers: list[tuple[str, nn.Module]]) -> None:
    """Fail with one clear line unless every name in lora_modules names targeted layers and some target is left to
    DenseLoRA (else the adapter is plain LoRA: use peft.LoraConfig)."""
    if not config.lora_modules:
        return
    keys = [key for key, _ in layers]
    kinds = sorted({module_kind(key) for key in keys})
    for name in sorted(config.lora_modules):
        if not any(matches_name(key, name) for key in keys):
            raise ValueError(
                f"lora module {name!r} names none of the targeted layers; lora_modules must name some of the targets "
                f"{kinds}"
            )
    if all(config.adapts_with_lora(key) for key in keys):
        raise ValueError(
            f"lora_modules {sorted(config.lora_modules)} cover every target {kinds}, leaving DenseLoRA none; "
            "leave it some, or use peft.LoraConfig"
        )
