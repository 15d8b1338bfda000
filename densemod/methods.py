"""One entry point from a method name and the usual knobs to a PEFT config, so one sweep can compare methods."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

from peft import AdaLoraConfig, LoKrConfig, LoraConfig, PeftConfig, PeftModel, VeraConfig

from .denselora import VARIANTS, DenseLoraConfig
from .denselora.config import check_alpha, check_choice, check_dropout, check_rank

METHODS = ("denselora", "lora", "dora", "vera", "lokr", "adalora")
# Methods whose PEFT model adds a regulariser of its own to the model's loss: AdaLoRA its orthogonality penalty on P and
# Q (orth_reg_weight). Whoever logs the loss should log the task's part apart from it.
AUXILIARY_LOSS_METHODS = ("adalora",)
PAPER_TARGETS = ("q", "k", "v", "up", "down")
# Short names for the LLaMA-family projections; any other name is passed to PEFT as it is.
TARGET_ALIASES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
# The paper's target-module sets by name (its QKV, UD, QKVUD, ...). A set name is recognised only as the whole value,
# so a module that happens to be called "qkv" can still be targeted as ["qkv"].
TARGET_SETS = {
    "qkv": "q,k,v", "ud": "up,down", "qkvud": "q,k,v,up,down", "qkvo": "q,k,v,o", "qkvoud": "q,k,v,o,up,down",
    "all-linear": "all-linear",
}


def resolve_targets(targets: Union[str, Iterable[str]]) -> Union[str, list[str]]:
    """'q,k,v', 'qkv' or ['q', 'k_proj', 'v'] -> ['q_proj', 'k_proj', 'v_proj']; 'all-linear' stays as it is.

    For a regex over module paths, build the method's PEFT config directly.
    """
    if isinstance(targets, str):
        targets = TARGET_SETS.get(targets, targets)
    if targets == "all-linear":
        return targets
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise ValueError(f"target modules must name at least one module; got {targets!r}")
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
) -> PeftConfig:
    """The PEFT config for `method` at rank `r`.

    alpha defaults to 2 * r (the paper's recipe). Where a method lacks a knob the mapping is:
    VeRA has no alpha (its scaling vectors are learned) and ignores it; LoKr has no input dropout, so `dropout`
    becomes its rank dropout; AdaLoRA starts at rank 1.5 * r and prunes to an average of r over `total_steps`,
    which it needs, and its training loop must call `step_hook(model)` after every optimizer step.
    """
    check_choice("method", method, METHODS)
    check_choice("variant", variant, VARIANTS)
    if method != "denselora" and variant != "denselora":
        raise ValueError(f"variant {variant!r} applies to method 'denselora' only; got method {method!r}")
    check_rank(r)
    alpha = 2 * r if alpha is None else alpha
    check_alpha(alpha)
    check_dropout(dropout)
    targets = resolve_targets(target_modules)
    common = {"r": r, "target_modules": targets, "task_type": task_type}
    if method == "denselora":
        return DenseLoraConfig(**common, lora_alpha=alpha, lora_dropout=dropout, variant=variant)
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


def step_hook(model: PeftModel) -> Callable[[int], None]:
    """What the training loop calls after each optimizer step, before zeroing gradients, with the global step.

    AdaLoRA reallocates its rank budget there (PEFT leaves the call to the loop); every other method needs nothing.
    """
    tuner = model.base_model
    if hasattr(tuner, "update_and_allocate"):
        return tuner.update_and_allocate
    return lambda step: None
