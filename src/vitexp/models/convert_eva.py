"""What a timm `Eva` RoPE ViT is in vitexp's terms: RoPE-ViT's models
(`vit_{small,base,large}_patch16_rope{,_mixed}{,_ape}_224`) are plain pre-norm ViTs with
LayerScale, a class token and 2-D rotary embeddings (plus, for `_ape`, a learned table on
the patches). `convert.from_timm` loads their weights with these fields.
"""

from __future__ import annotations

from typing import Any

from torch import nn

ROPE_CLASSES = {"RotaryEmbeddingCat": "rope_axial", "RotaryEmbeddingMixed": "rope_mixed"}


def _rope_problems(rope: nn.Module) -> list[str]:
    """Settings of timm's rotary embedding that vitexp's `rope.py` does not compute."""
    name = type(rope).__name__
    if name not in ROPE_CLASSES:
        return [f"rotary embedding {name}"]
    problems = []
    if rope.grid_indexing != "xy":
        problems.append(f"rope_grid_indexing={rope.grid_indexing!r}")
    if getattr(rope, "aug_active", False):
        problems.append("rope coordinate augmentation")
    if name == "RotaryEmbeddingCat":
        if rope.in_pixels or rope.grid_type != "index":
            problems.append("pixel-based rope frequencies")
        if rope.ref_feat_shape is not None or rope.grid_offset:
            problems.append("ref_feat_shape / rope_grid_offset")
        if rope.rotate_half:
            problems.append("rope_rotate_half=True")
    return problems


def _block_problems(block: nn.Module) -> list[str]:
    problems = []
    if type(block).__name__ != "EvaBlock" or type(block.attn).__name__ != "AttentionRope":
        return [f"{type(block).__name__} with {type(block.attn).__name__}"]
    attn = block.attn
    if getattr(attn, "qkv", None) is None:
        problems.append("separate q/k/v projections")
    for part in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, part, nn.Identity()), nn.Identity):
            problems.append(f"attn.{part}")
    if getattr(attn, "gate", None) is not None:
        problems.append("gated attention")
    if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
        problems.append("grouped-query attention")
    mlp = block.mlp
    if type(mlp).__name__ != "Mlp" or not isinstance(getattr(mlp, "norm", None), nn.Identity):
        problems.append(f"MLP {type(mlp).__name__}")
    elif type(mlp.act) is not nn.GELU or mlp.act.approximate != "none":
        problems.append(f"activation {mlp.act}")
    if not isinstance(block.norm1, nn.LayerNorm):
        problems.append(f"norm layer {type(block.norm1).__name__}")
    if (block.gamma_1 is None) != (block.gamma_2 is None):
        problems.append("LayerScale on one branch only")
    return problems


def eva_fields(timm_model: nn.Module) -> dict[str, Any]:
    """The ViTConfig fields in which a timm Eva RoPE ViT differs from a plain timm ViT (the
    rest: `convert.shared_fields`); a feature vitexp does not have raises ValueError naming
    it."""
    rope = getattr(timm_model, "rope", None)
    problems = ["no rotary embedding"] if rope is None else _rope_problems(rope)
    problems += _block_problems(timm_model.blocks[0])
    if timm_model.num_prefix_tokens != (timm_model.cls_token is not None):
        problems.append("register tokens")
    if timm_model.global_pool not in ("token", "avg"):
        problems.append(f"global_pool={timm_model.global_pool!r}")
    if not isinstance(timm_model.norm_pre, nn.Identity):
        problems.append("pre-transformer norm")
    if getattr(timm_model, "attn_pool", None) is not None:
        problems.append("attention pooling")
    if timm_model.patch_embed.proj.bias is None:
        problems.append("a patch embedding without bias")
    if problems:
        raise ValueError(
            f"timm Eva model uses {', '.join(problems)}, which vitexp's ViT does not implement; "
            "RoPE-ViT's models (vit_*_patch16_rope*) convert"
        )
    block = timm_model.blocks[0]
    kind = ROPE_CLASSES[type(rope).__name__]
    return {
        "in_chans": timm_model.patch_embed.proj.in_channels,
        "pos_embed": {
            "kind": kind + ("_ape" if timm_model.pos_embed is not None else ""),
            "rope_theta": float(rope.temperature),
        },
        "layer_scale_init": block.init_values if block.gamma_1 is not None else None,
    }
