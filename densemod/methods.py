"""One entry point from a method name and the usual knobs to a PEFT config, so one sweep can compare methods."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

from peft import AdaLoraConfig, LoKrConfig, LoraConfig, PeftConfig, PeftModel, VeraConfig

from .denselora import SHARE_SCOPES, VARIANTS, DenseLoraConfig
from .denselora.config import check_alpha, check_choice, check_dropout, check_rank, default_alpha

METHODS = ("denselora", "lora", "dora", "vera", "lokr", "adalora", "hybrid")
# Methods whose PEFT model adds a regulariser of its own to the model's loss: AdaLoRA its orthogonality penalty on P and
# Q (orth_reg_weight). Whoever logs the loss should log the task's part apart from it.
AUXILIARY_LOSS_METHODS = ("adalora",)
# Methods built on DenseLoRA's layers, which take its variant and share_scope.
DENSELORA_METHODS = ("denselora", "hybrid")
PAPER_TARGETS = ("q", "k", "v", "up", "down")
# Short names for the LLaMA-family projections; any other name is passed to PEFT as it is.
TARGET_ALIASES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
# A hybrid's LoRA part by default: the attention projections among its targets (the paper's Table 8 puts LoRA on q, k,
# v and DenseLoRA on up, down).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The paper's target-module sets by name (its QKV, UD, QKVUD, ...). A set name is recognised only as the whole value,
# so a module that happens to be called "qkv" can still be targeted as ["qkv"].
TARGET_SETS = {
    "qkv": "q,k,v", "ud": "up,down", "qkvud": "q,k,v,up,down", "qkvo": "q,k,v,o", "qkvoud": "q,k,v,o,up,down",
    "all-linear": "all-linear",
}


def resolve_targets(targets: Union[str, Iterable[str]], what: str = "target modules") -> Union[str, list[str]]:
    """'q,k,v', 'qkv' or ['q', 'k_proj', 'v'] -> ['q_proj', 'k_proj', 'v_proj']; 'all-linear' stays as it is.

    For a regex over module paths, build the method's PEFT config directly. `what` names the argument in errors.
    """
    if isinstance(targets, str):
        targets = TARGET_SETS.get(targets, targets)
    if targets == "all-linear":
        return targets
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise ValueError(f"{what} must name at least one module; got {targets!r}")
    return [TARGET_ALIASES.get(name, name) for name in names]


def build_peft_config(
    method: str,
    r: int,
    alpha: Optional[float] = None,
    dropout: float = 0.05,
    target_modules: Union[str, Iterable[str]] = PAPER_TARGETS,
    variant: str = "denselora",
    total_steps: Optional[int] = None,
    task_type: Optional[str] = "CAUSAL_LM",
    lora_targets: Optional[Union[str, Iterable[str]]] = None,
    share_scope: str = "kind",
) -> PeftConfig:
    """The PEFT config for `method` at rank `r`.

    alpha defaults to 2 * r (the paper's recipe). Where a method lacks a knob the mapping is:
    VeRA has no alpha (its scaling vectors are learned) and ignores it; LoKr has no input dropout, so `dropout`
    becomes its rank dropout; AdaLoRA starts at rank 1.5 * r and prunes to an average of r over `total_steps`,
    which it needs, and its training loop must call `step_hook(model)` after every optimizer step.

    `variant` and `share_scope` (DenseLoraConfig's) apply to the methods built on DenseLoRA: "denselora" and "hybrid".

    "hybrid" adapts `target_modules` as every method does, with plain LoRA on `lora_targets` among them (by default
    the attention projections among them) and DenseLoRA on the rest, all at rank r, alpha and dropout: on the default
    targets q, k, v, up, down that is the paper's Table 8. It is one DenseLoraConfig (lora_modules), so
    get_peft_model, save_pretrained, PeftModel.from_pretrained and parameter_report need nothing else.
    """
    check_choice("method", method, METHODS)
    if method != "hybrid" and lora_targets is not None:
        raise ValueError(f"lora_targets applies to method 'hybrid' only; got method {method!r}")
    check_choice("variant", variant, VARIANTS)
    check_choice("share_scope", share_scope, SHARE_SCOPES)
    for name, value, default in (("variant", variant, "denselora"), ("share_scope", share_scope, "kind")):
        if method not in DENSELORA_METHODS and value != default:
            raise ValueError(
                f"{name} {value!r} applies to methods {' and '.join(map(repr, DENSELORA_METHODS))} only; "
                f"got method {method!r}"
            )
    check_rank(r)
    alpha = default_alpha(r) if alpha is None else alpha
    check_alpha(alpha)
    check_dropout(dropout)
    targets = resolve_targets(target_modules)
    common = {"r": r, "target_modules": targets, "task_type": task_type}
    if method in DENSELORA_METHODS:
        lora_modules = hybrid_lora_modules(targets, lora_targets) if method == "hybrid" else None
        return DenseLoraConfig(
            **common, lora_alpha=alpha, lora_dropout=dropout, variant=variant, share_scope=share_scope,
            lora_modules=lora_modules,
        )
    if method in ("lora", "dora"):
        return LoraConfig(**common, lora_alpha=alpha, lora_dropout=dropout, use_dora=method == "dora")
    if method == "vera":
        return VeraConfig(**common, vera_dropout=dropout)
    if method == "lokr":
        return LoKrConfig(**common, alpha=alpha, rank_dropout=dropout)
    if total_steps is None or isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 2:
        raise ValueError(f"method 'adalora' needs total_steps, an integer >= 2 (the training steps); got {total_steps!r}")
    del common["r"]
    # AdaLoRA's schedule: no pruning in the first and last 10 % of steps, in between it reallocates every step.
    return AdaLoraConfig(
        **common, init_r=r + r // 2, target_r=r, lora_alpha=alpha, lora_dropout=dropout, total_step=total_steps,
        tinit=total_steps // 10, tfinal=total_steps // 10, deltaT=1,
    )


def hybrid_lora_modules(
    targets: Union[str, list[str]], lora_targets: Optional[Union[str, Iterable[str]]]
) -> Union[str, list[str]]:
    """The modules a hybrid gives to LoRA: lora_targets resolved, or else the attention projections among targets."""
    if lora_targets is not None:
        return resolve_targets(lora_targets, "lora_targets")
    if targets == "all-linear":
        return list(ATTENTION_PROJECTIONS)
    attention = [name for name in targets if name in ATTENTION_PROJECTIONS]
    if not attention:
        raise ValueError(
            f"method 'hybrid' puts LoRA on the attention projections among its targets, and {targets} has none "
            f"({', '.join(ATTENTION_PROJECTIONS)}); name LoRA's part with lora_targets"
        )
    return attention


def step_hook(model: PeftModel) -> Callable[[int], None]:
    """What the training loop calls after each optimizer step, before zeroing gradients, with the global step.

    AdaLoRA reallocates its rank budget there (PEFT leaves the call to the loop); every other method needs nothing.
    """
    tuner = model.base_model
    if hasattr(tuner, "update_and_allocate"):
        return tuner.update_and_allocate
    return lambda step: None
