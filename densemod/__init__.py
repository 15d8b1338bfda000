"""densemod: DenseLoRA (Mu et al., ACL 2025) as a PEFT method, its variants, the PEFT baselines behind one entry
point, and exact parameter accounting.

    import peft, densemod
    model = peft.get_peft_model(base, densemod.DenseLoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
"""

from .accounting import ParameterReport, parameter_report, predict_trainable, saved_module_parameters, target_shapes
from .denselora import (
    SHARE_SCOPES, VARIANTS, DenseLoraConfig, DenseLoraLayer, DenseLoraModel, DenseLoraPeftType, MergeError,
)
from .methods import AUXILIARY_LOSS_METHODS, METHODS, TARGET_SETS, build_peft_config, step_hook

__all__ = [
    "AUXILIARY_LOSS_METHODS", "METHODS", "SHARE_SCOPES", "VARIANTS", "DenseLoraConfig", "DenseLoraLayer", "DenseLoraModel",
    "DenseLoraPeftType", "MergeError",
    "ParameterReport", "TARGET_SETS", "build_peft_config", "parameter_report", "predict_trainable",
    "saved_module_parameters", "step_hook", "target_shapes",
]
