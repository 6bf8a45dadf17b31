"""CIFAR image classifiers registered with the transformers Auto classes.

Importing this package registers ``hf_ddlr_resnet``, ``hf_ddlr_vgg``, ``hf_ddlr_wrn`` and
``hf_ddlr_cnn`` with ``AutoConfig`` and ``AutoModelForImageClassification``, so saved checkpoints
load with ``AutoModelForImageClassification.from_pretrained(path)`` once ``hf_ddlr.models`` is imported.
"""

from transformers import AutoConfig, AutoModelForImageClassification

from hf_ddlr.models.configuration import CifarResNetConfig, CifarVGGConfig, SmallCNNConfig, WideResNetConfig
from hf_ddlr.models.modeling import (
    CifarResNetForImageClassification,
    CifarVGGForImageClassification,
    SmallCNNForImageClassification,
    WideResNetForImageClassification,
)

MODEL_CLASSES = {
    CifarResNetConfig: CifarResNetForImageClassification,
    CifarVGGConfig: CifarVGGForImageClassification,
    WideResNetConfig: WideResNetForImageClassification,
    SmallCNNConfig: SmallCNNForImageClassification,
}


def register_auto_classes() -> None:
    """Register the configs and models with the Auto classes (idempotent; runs on import)."""
    for config_cls, model_cls in MODEL_CLASSES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForImageClassification.register(config_cls, model_cls, exist_ok=True)


register_auto_classes()

__all__ = [
    "MODEL_CLASSES",
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "CifarVGGConfig",
    "CifarVGGForImageClassification",
    "SmallCNNConfig",
    "SmallCNNForImageClassification",
    "WideResNetConfig",
    "WideResNetForImageClassification",
    "register_auto_classes",
]
