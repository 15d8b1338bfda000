"""Bad input fails early with one clear line naming the bad value and what is allowed."""

import re
import warnings

import peft
import pytest
from peft.tuners.tuners_utils import BaseTunerLayer

import densemod
from conftest import PAPER_TARGETS


def make(**kwargs):
    return densemod.DenseLoraConfig(target_modules=PAPER_TARGETS, **kwargs)


@pytest.mark.parametrize("r", [0, -4, 2.5, True])
def test_rank_must_be_a_positive_integer(r):
    with pytest.raises(ValueError, match=rf"^r must be a positive integer \(1, 2, \.\.\.\); got {r!r}$"):
        make(r=r)
    with pytest.raises(ValueError, match=rf"^r must be a positive integer .*got {r!r}$"):
        densemod.build_peft_config("lora", r)


@pytest.mark.parametrize("alpha", [0, -1.0])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match=rf"^lora_alpha must be a number > 0; got {alpha!r}$"):
        make(r=8, lora_alpha=alpha)
    with pytest.raises(ValueError, match="lora_alpha must be a number > 0"):
        densemod.build_peft_config("dora", 8, alpha=alpha)


@pytest.mark.parametrize("dropout", [1.0, -0.1, 1.5])
def test_dropout_must_be_in_the_unit_interval(dropout):
    with pytest.raises(ValueError, match=rf"^lora_dropout must be a number in \[0, 1\); got {dropout!r}$"):
        make(lora_dropout=dropout)
    with pytest.raises(ValueError, match=r"lora_dropout must be a number in \[0, 1\)"):
        densemod.build_peft_config("denselora", 8, dropout=dropout)


def test_unknown_variant_names_the_allowed_ones():
    expected = r"^variant must be one of 'denselora', 'freeze', 'only_matrix'; got 'dense'$"
    with pytest.raises(ValueError, match=expected):
        make(variant="dense")
    with pytest.raises(ValueError, match=expected):
        densemod.build_peft_config("denselora", 8, variant="dense")


def test_unknown_share_scope():
    with pytest.raises(ValueError, match=r"^share_scope must be one of 'kind', 'layer'; got 'model'$"):
        make(share_scope="model")


def test_unknown_method_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"^method must be one of 'denselora', 'lora', 'dora', 'vera', 'lokr', 'adalora', 'hybrid'; got 'qlora'$"):
        densemod.build_peft_config("qlora", 8)


@pytest.mark.parametrize("setting", [dict(variant="freeze"), dict(share_scope="layer")])
def test_variant_and_share_scope_belong_to_the_denselora_methods(setting):
    ((name, value),) = setting.items()
    with pytest.raises(ValueError, match=rf"^{name} '{value}' applies to methods 'denselora' and 'hybrid' only; got method 'lora'$"):
        densemod.build_peft_config("lora", 8, **setting)


def test_unknown_share_scope_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"^share_scope must be one of 'kind', 'layer'; got 'model'$"):
        densemod.build_peft_config("denselora", 8, share_scope="model")


def test_adalora_needs_its_step_budget():
    with pytest.raises(ValueError, match=r"method 'adalora' needs total_steps.*got None"):
        densemod.build_peft_config("adalora", 8)


def test_empty_target_list():
    with pytest.raises(ValueError, match=r"target modules must name at least one module; got ' , '"):
        densemod.build_peft_config("denselora", 8, target_modules=" , ")


def untouched(model) -> bool:
    return not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not hasattr(model, "peft_config")


@pytest.mark.parametrize("targets", [["q_proj", "query"], ["qproj"]])
def test_target_matching_nothing_fails_before_the_model_is_touched(targets, tiny_llama):
    config = densemod.DenseLoraConfig(r=8, target_modules=targets)
    bad = [t for t in targets if t != "q_proj"][0]
    with pytest.raises(ValueError, match=rf"^target module '{bad}' matches no module of the model; its linear "
                                         r"modules are named \['down_proj', 'gate_proj', 'k_proj', 'lm_head', "
                                         r"'o_proj', 'q_proj', 'up_proj', 'v_proj'\]$"):
        peft.get_peft_model(tiny_llama, config)
    assert untouched(tiny_llama)


def test_target_regex_matching_nothing(tiny_llama):
    config = densemod.DenseLoraConfig(r=8, target_modules=r".*\.attention\.query")
    with pytest.raises(ValueError, match=r"target module '.*query' matches no module"):
        peft.get_peft_model(tiny_llama, config)
    assert untouched(tiny_llama)


def test_target_that_is_not_linear(tiny_llama):
    config = densemod.DenseLoraConfig(r=8, target_modules=["q_proj", "mlp"])
    with pytest.raises(ValueError, match=r"target module 'mlp' matches 'model.layers.0.mlp', a LlamaMLP; "
                                         r"DenseLoRA adapts nn.Linear layers only"):
        peft.get_peft_model(tiny_llama, config)
    assert untouched(tiny_llama)


def test_a_bad_second_adapter_leaves_the_first_intact(tiny_llama):
    model = peft.get_peft_model(tiny_llama, densemod.DenseLoraConfig(r=8, target_modules=PAPER_TARGETS))
    with pytest.raises(ValueError, match="target module 'query' matches no module"):
        model.add_adapter("second", densemod.DenseLoraConfig(r=8, target_modules=["query"]))
    assert list(model.peft_config) == ["default"]
    assert set(model.base_model.denselora_encoder) == {"default"}


@pytest.mark.parametrize(
    ("r", "kinds"),
    [
        (40, {"k_proj", "v_proj"}),  # larger than their output size 32 only
        (80, set(PAPER_TARGETS)),  # larger than 64, the smaller side of every kind
    ],
)
def test_rank_above_a_module_size_warns_once_naming_the_kinds(r, kinds, tiny_llama):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.get_peft_model(tiny_llama, make(r=r, share_scope="layer"))
    (message,) = [str(w.message) for w in caught if "DenseLoRA r=" in str(w.message)]
    assert set(re.findall(r"(\w+) \(in \d+, out \d+: at most \d+\)", message)) == kinds
    if r == 40:
        assert message == (
            "DenseLoRA r=40 is larger than a size of k_proj (in 64, out 32: at most 32), "
            "v_proj (in 64, out 32: at most 32): their updates cannot have rank 40"
        )
