"""DenseLoRA as a PEFT method: importing this package registers it with PEFT."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import PEFT_TYPE, SHARE_SCOPES, VARIANTS, DenseLoraConfig, DenseLoraPeftType
from .layer import DenseLoraLayer, MergeError
from .model import DenseLoraModel

# peft.register_peft_method refuses names outside its closed PeftType enum, so DenseLoRA's own member (it equals and
# hashes like the string "DENSELORA" that adapter_config.json holds) goes straight into the mappings that
# get_peft_model, save_pretrained and PeftModel.from_pretrained read. These are PEFT internals:
# pyproject pins peft and tests/test_peft_integration.py checks the round trip.
PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = DenseLoraConfig
PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = DenseLoraModel
PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = DenseLoraModel.prefix

__all__ = [
    "PEFT_TYPE", "SHARE_SCOPES", "VARIANTS", "DenseLoraConfig", "DenseLoraLayer", "DenseLoraModel", "DenseLoraPeftType",
    "MergeError",
]
