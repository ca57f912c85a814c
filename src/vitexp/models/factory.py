"""Model sizes by name: the paper's Table 1 (B, L, H) plus Ti and S (DeiT; Steiner et al.)."""

from __future__ import annotations

from typing import Any

from vitexp.models.vit import VisionTransformer

# width D, layers L, heads, MLP size = mlp_ratio * D, patch size
VARIANTS: dict[str, dict[str, Any]] = {
    "vit_ti16": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16),
    "vit_s16": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    "vit_b16": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    "vit_b32": dict(embed_dim=768, depth=12, num_heads=12, patch_size=32),
    "vit_l16": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16),
    "vit_h14": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
    # ViT-B on the ResNet-50 feature map (stride 16) with 1x1 patches: R50+ViT-B/16.
    "hybrid_r50_b16": dict(embed_dim=768, depth=12, num_heads=12, patch_size=1, stem="r50"),
    # For tests and the embedded quickstart: 32 px images, 4 px patches, 64 tokens.
    "vit_tiny_debug": dict(embed_dim=64, depth=4, num_heads=4, patch_size=4, img_size=32),
}


def create_model(name: str, **overrides: Any) -> VisionTransformer:
    """`create_model("vit_b16", img_size=384, num_classes=10, pos_embed="learned_2d")`."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
    return VisionTransformer(**{**VARIANTS[name], **overrides})
