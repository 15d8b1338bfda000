"""Configuration of a DenseLoRA adapter (Mu et al., ACL 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

PEFT_TYPE = "DENSELORA"
VARIANTS = ("denselora", "freeze", "only_matrix")
SHARE_SCOPES = ("kind", "layer")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_rank(r: object) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer (1, 2, ...); got {r!r}")


def check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"lora_alpha must be a number > 0; got {alpha!r}")


def check_dropout(dropout: object) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1); got {dropout!r}")


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
    variant: str = field(default="denselora", metadata={"help": f"One of {VARIANTS}."})
    share_scope: str = field(default="kind", metadata={"help": f"One of {SHARE_SCOPES}."})
    init_weights: bool = field(default=True, metadata={"help": "False: random init everywhere (for tests)."})
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indexes."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers, with layers_to_transform."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        check_rank(self.r)
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.r
        check_alpha(self.lora_alpha)
        check_dropout(self.lora_dropout)
        check_choice("variant", self.variant, VARIANTS)
        check_choice("share_scope", self.share_scope, SHARE_SCOPES)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform: say which layer indexes to adapt")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def uses_activation(self) -> bool:
        return self.variant != "only_matrix"

    @property
    def trains_projections(self) -> bool:
        return self.variant != "freeze"
