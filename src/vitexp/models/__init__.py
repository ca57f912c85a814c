"""The Vision Transformer, its position embeddings, hybrid stem and weight import, and the
paper's CNN baseline, BiT ResNet-v2.

Plain PyTorch: nothing here imports Lightning, Hydra or the rest of vitexp, so the folder
can be copied into other code as it is.
"""

from vitexp.models.bit import BiTConfig, ResNetV2
from vitexp.models.common import ModelConfig
from vitexp.models.factory import SIZES, build_model, create_model, model_config
from vitexp.models.pos_embed import NotApplicableCell, PosEmbedSpec
from vitexp.models.vit import VisionTransformer, ViTConfig

__all__ = [
    "SIZES",
    "BiTConfig",
    "ModelConfig",
    "NotApplicableCell",
    "PosEmbedSpec",
    "ResNetV2",
    "ViTConfig",
    "VisionTransformer",
    "build_model",
    "create_model",
    "model_config",
]
