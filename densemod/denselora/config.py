"""Configuration of a DenseLoRA adapter (Mu et al., ACL 2025)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft import LoraConfig
from peft.config import PeftConfig

from .card import name_in_model_card


class DenseLoraPeftType(str, enum.Enum):
    """DenseLoRA's PEFT type, a member of an enum of the same kind as PEFT's closed `PeftType`.

    PEFT's code and its users treat a config's `peft_type` as a `PeftType` member: they read `.value`, compare it
    with the string, key PEFT's mappings with it and write it to adapter_config.json. A str-mixin enum member does all
    of that exactly as PEFT's own members do: `.value` is "DENSELORA", it equals and hashes like "DENSELORA", and
    JSON writes it as "DENSELORA".
    """

    DENSELORA = "DENSELORA"


PEFT_TYPE = DenseLoraPeftType.DENSELORA
VARIANTS = ("denselora", "freeze", "only_matrix")
SHARE_SCOPES = ("kind", "layer")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_rank(r: object) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer (1, 2, ...); got {r!r}")


def default_alpha(r: int) -> int:
    """lora_alpha when none is given: 2r, the paper's (and LLM-Adapters') recipe, so that alpha / r is 2 at any rank."""
    return 2 * r


def check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"lora_alpha must be a number > 0; got {alpha!r}")


def check_dropout(dropout: object) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1); got {dropout!r}")


def check_bias(bias: object) -> None:
    if bias != "none":
        raise ValueError(f"bias must be 'none': DenseLoRA has no bias of its own to train; got {bias!r}")


def check_layer_selection(target_modules: object, layers_to_transform: object, layers_pattern: object) -> None:
    # The same rules as LoraConfig's: layer indexes are found in module names, which a regex target already spells out.
    if isinstance(target_modules, str) and (layers_to_transform is not None or layers_pattern is not None):
        raise ValueError(
            "layers_to_transform and layers_pattern need target_modules as a list of names, not the string "
            f"{target_modules!r}"
        )
    if layers_pattern and layers_to_transform is None:
        raise ValueError("layers_pattern needs layers_to_transform: say which layer indexes to adapt")


def check_lora_modules(lora_modules: object) -> None:
    if lora_modules is None:
        return
    names = lora_modules if isinstance(lora_modules, (list, tuple, set)) else ()
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(
            "lora_modules must be None or a non-empty list of module names, some of target_modules; "
            f"got {lora_modules!r}"
        )


def matches_name(key: str, name: str) -> bool:
    """PEFT's rule for a name in a list of target modules: the module's key is the name or ends in '.' + name."""
    return key == name or key.endswith(f".{name}")


@dataclass
class DenseLoraConfig(PeftConfig):
    """DenseLoRA: y = W0 h + (alpha / r) * drop(act(W_d M drop(act(W_e drop(h))))).

    W_e (r x in) and W_d (out x r) are shared by every adapted layer of one module kind (all `q_proj` share one
    pair); M (r x r) belongs to one layer.

    Args:
        r: size of the dense matrix M and of the shared encoder's output.
        lora_alpha: scaling numerator, the update is multiplied by lora_alpha / r. Defaults to 2 * r (the paper's).
        lora_dropout: dropout before the encoder, after the encoder's activation and after the decoder's activation.
        target_modules: module names (matched as name suffixes, as in PEFT), a regex, or "all-linear".
        variant: "denselora" (the paper's method), "freeze" (W_e and W_d frozen at random values, only M trains;
            M starts at zero so that the initial model equals the base model), "only_matrix" (no activation, so
            the update is the matrix (alpha / r) W_d M W_e and can be merged into W0).
        share_scope: "kind" (W_e, W_d shared by all layers of a module kind) or "layer" (each adapted layer has its
            own W_e, W_d: the ablation without sharing).
        init_weights: True starts W_d at zero (variant "freeze": M at zero) so that the adapter is a no-op at first;
            False initialises every matrix randomly, which tests use to get a non-trivial adapter.
        lora_modules: names of some of the targets (matched as name suffixes) that plain LoRA adapts instead, at the
            same r, alpha and dropout: the paper's hybrid (Table 8: LoRA on q, k, v, DenseLoRA on up, down is
            target_modules=[q, k, v, up, down], lora_modules=[q, k, v]). As IA3Config's feedforward_modules,
            they are a subset of target_modules, so target_modules always names everything the adapter adapts.
            The LoRA layers are PEFT's own, saved, loaded and disabled with the DenseLoRA layers as one adapter
            (and merged with them, as variant "only_matrix" allows).

    The generic PEFT fields mean what they mean for LoraConfig: exclude_modules, layers_to_transform and
    layers_pattern narrow the targets; modules_to_save trains a full copy of each named module (a classifier head,
    an embedding) beside the adapter and saves it with it; inference_mode freezes the adapter. fan_in_fan_out says
    that the targets store their weight as (in, out), as GPT-2's Conv1D does; as with LoRA, a value that disagrees
    with a target's type is corrected with a warning. bias can only be "none": DenseLoRA has no bias of its own.
    Saving an adapter names DenseLoRA and densemod in the model card PEFT writes beside it.
    """

    r: int = field(default=16, metadata={"help": "Rank: the size of the dense r x r matrix M."})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "Scaling numerator; None means 2 * r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout probability in [0, 1)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Names of the nn.Linear modules to adapt (suffix match), a regex, or 'all-linear'."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or a regex of modules not to adapt."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules (name suffixes) trained in full beside the adapter and saved with it, e.g. a head."},
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True if the targets store their weight as (in, out), like GPT-2's Conv1D."}
    )
    bias: str = field(default="none", metadata={"help": "Only 'none': DenseLoRA has no bias of its own."})
    variant: str = field(default="denselora", metadata={"help": f"One of {VARIANTS}."})
    share_scope: str = field(default="kind", metadata={"help": f"One of {SHARE_SCOPES}."})
    init_weights: bool = field(default=True, metadata={"help": "False: random init everywhere (for tests)."})
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indexes."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers, with layers_to_transform."}
    )
    lora_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Some of target_modules (names) that plain LoRA adapts instead (a hybrid)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        check_rank(self.r)
        if self.lora_alpha is None:
            self.lora_alpha = default_alpha(self.r)
        check_alpha(self.lora_alpha)
        check_dropout(self.lora_dropout)
        check_choice("variant", self.variant, VARIANTS)
        check_choice("share_scope", self.share_scope, SHARE_SCOPES)
        check_bias(self.bias)
        check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern)
        check_lora_modules(self.lora_modules)
        for name in ("target_modules", "exclude_modules", "lora_modules"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, set(getattr(self, name)))

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write adapter_config.json and name DenseLoRA in the model card beside it.

        PeftModel.save_pretrained writes the card (README.md) just before each adapter's config and offers no other
        hook into it, so the card is completed here.
        """
        super().save_pretrained(save_directory, **kwargs)
        name_in_model_card(save_directory)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def uses_activation(self) -> bool:
        return self.variant != "only_matrix"

    @property
    def trains_projections(self) -> bool:
        return self.variant != "freeze"

    def adapts_with_lora(self, key: str) -> bool:
        """Whether the targeted layer at `key` gets plain LoRA (named by lora_modules) rather than DenseLoRA."""
        return any(matches_name(key, name) for name in self.lora_modules or ())

    def lora_config(self) -> LoraConfig:
        """The LoraConfig of the layers that lora_modules names: this adapter's r, alpha, dropout and layout."""
        return LoraConfig(
            r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, fan_in_fan_out=self.fan_in_fan_out,
            init_lora_weights=self.init_weights, inference_mode=self.inference_mode,
        )
