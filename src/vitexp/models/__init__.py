"""The Vision Transformer, its position embeddings, hybrid stem and weight import."""

from vitexp.models.factory import VARIANTS, create_model
from vitexp.models.pos_embed import PosEmbedSpec
from vitexp.models.vit import VisionTransformer

__all__ = ["VARIANTS", "PosEmbedSpec", "VisionTransformer", "create_model"]
