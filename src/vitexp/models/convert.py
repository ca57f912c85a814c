"""Weight import from timm: a live timm `VisionTransformer`, or a timm-format weight file.

The paper's weights are published in timm format (e.g. `vit_base_patch16_224.augreg_in21k`
as `model.safetensors`, or the older `jx_vit_*.pth` files that still carry the pre-logits
layer). Original JAX `.npz` files load into timm first (`timm_model.load_pretrained(path)`),
then through `from_timm`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from vitexp.models.pos_embed import resample_grid, square_grid
from vitexp.models.vit import VisionTransformer, ViTConfig

# timm options whose computation vitexp's ViT does not have (name -> value meaning "off").
_UNSUPPORTED = {
    "num_reg_tokens": 0,
    "pool_include_prefix": False,
}


def _check_supported(timm_model: nn.Module) -> None:
    """Refuse timm features that would silently change the computation."""
    name = type(timm_model).__name__
    if name != "VisionTransformer":
        raise ValueError(f"from_timm converts timm VisionTransformer models, got {name}")
    problems = [
        f"{attr}={getattr(timm_model, attr)!r}"
        for attr, off in _UNSUPPORTED.items()
        if getattr(timm_model, attr, off) != off
    ]
    if timm_model.global_pool not in ("token", "avg"):
        problems.append(f"global_pool={timm_model.global_pool!r}")
    if not isinstance(timm_model.norm_pre, nn.Identity):
        problems.append("pre_norm=True")
    if isinstance(timm_model.norm, nn.Identity) and isinstance(timm_model.fc_norm, nn.Identity):
        problems.append("final_norm=False")
    block = timm_model.blocks[0]
    for part in ("ls1", "ls2", "attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm"):
        module = block.get_submodule(part) if _has(block, part) else nn.Identity()
        if not isinstance(module, nn.Identity):
            problems.append(f"blocks.*.{part} ({type(module).__name__})")
    if (
        type(block.mlp.act) is not nn.GELU
        or getattr(block.mlp.act, "approximate", "none") != "none"
    ):
        problems.append(f"activation {block.mlp.act}")
    if not isinstance(block.norm1, nn.LayerNorm):
        problems.append(f"norm layer {type(block.norm1).__name__}")
    if block.attn.proj.bias is None:
        problems.append("proj_bias=False")
    if problems:
        raise ValueError(
            f"timm model uses {', '.join(problems)}, which vitexp's ViT does not implement; "
            "only the paper's architecture (class token or GAP, LayerNorm, GELU) converts"
        )


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def config_from_timm(timm_model: nn.Module) -> ViTConfig:
    """The ViTConfig that computes what the timm model computes (its head: `num_classes`)."""
    _check_supported(timm_model)
    block = timm_model.blocks[0]
    embed = timm_model.patch_embed
    pre_logits = getattr(timm_model, "pre_logits", None)
    representation_size = None
    if pre_logits is not None and isinstance(getattr(pre_logits, "fc", None), nn.Linear):
        representation_size = pre_logits.fc.out_features
    return ViTConfig(
        name=(getattr(timm_model, "pretrained_cfg", None) or {}).get("architecture", "timm"),
        img_size=tuple(embed.img_size),
        patch_size=tuple(embed.patch_size),
        patch_stride=tuple(embed.proj.stride),
        in_chans=embed.proj.in_channels,
        embed_dim=timm_model.embed_dim,
        depth=len(timm_model.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / timm_model.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None,
        pool="cls" if timm_model.global_pool == "token" else "gap",
        class_token=timm_model.cls_token is not None,
        fc_norm=not isinstance(timm_model.fc_norm, nn.Identity),
        representation_size=representation_size,
        pos_embed="learned_1d" if timm_model.pos_embed is not None else "none",
        norm_eps=block.norm1.eps,
    )


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _pos_embed_for(
    value: torch.Tensor,
    model: VisionTransformer,
    grid: tuple[int, int] | None,
    no_embed_class: bool | None,
) -> torch.Tensor:
    """timm `pos_embed` -> vitexp's 1-D table at the model's grid."""
    prefix = model.num_prefix_tokens
    if no_embed_class is None:  # a weight file does not say; the table's length does
        no_embed_class = bool(prefix) and _is_square(value.shape[1])
    if no_embed_class and prefix:
        # DeiT-3 / big_vision layout: the class token gets no position vector, which is
        # the same as a zero vector in vitexp's table.
        value = torch.cat([value.new_zeros(1, prefix, value.shape[2]), value], dim=1)
    grid = grid or square_grid(value.shape[1], prefix)
    spec = model.cfg.pos_embed
    return resample_grid(value, grid, model.grid_size, prefix, spec.interpolation, spec.antialias)


def convert_timm_state_dict(
    state_dict: dict[str, torch.Tensor],
    model: VisionTransformer,
    grid: tuple[int, int] | None = None,
    no_embed_class: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Rename a timm ViT state dict to vitexp's names for `model`, resampling `pos_embed`
    (saved on `grid`, square if not given) to the model's grid; the class-token row is kept."""
    out = {}
    for key, value in state_dict.items():
        if key == "pos_embed":
            out["encoder.pos_embeds.0.weight"] = _pos_embed_for(value, model, grid, no_embed_class)
        elif key.startswith(("blocks.", "norm.")):
            out["encoder." + key] = value
        elif key.startswith("pre_logits.fc."):
            out[key.replace("pre_logits.fc.", "pre_logits.0.")] = value
        elif re.match(r"^(cls_token|patch_embed\.proj\.|head\.|fc_norm\.)", key):
            out[key] = value
        else:
            raise ValueError(f"timm weight {key!r} has no place in vitexp's ViT")
    return out


def from_timm(timm_model: nn.Module) -> VisionTransformer:
    """A vitexp model with the same weights and the same logits as a timm ViT."""
    model = VisionTransformer(config_from_timm(timm_model), num_classes=timm_model.num_classes)
    state = convert_timm_state_dict(
        timm_model.state_dict(),
        model,
        grid=tuple(timm_model.patch_embed.grid_size),
        no_embed_class=timm_model.no_embed_class,
    )
    model.load_state_dict(state)
    return model.train(timm_model.training)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors`, `.pth`/`.pt`/`.bin` file (never unpickling code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, wrong format
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot read weights from {path}: {first_line} (is it a complete timm-format "
            ".safetensors/.pth state dict?)"
        ) from None
    for wrapper in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_timm_weights(model: VisionTransformer, path: str | Path) -> VisionTransformer:
    """Load a timm-format weight file into `model` (built with the matching size, e.g.
    `create_model("vit_b16", img_size=384, num_classes=10)`).

    Position embeddings are resampled to the model's resolution; a head whose class count
    differs (a fine-tune) is left as the model's own zero-initialised head, and a pre-logits
    layer the model lacks is dropped, as the paper does when fine-tuning.
    """
    state = convert_timm_state_dict(read_state_dict(path), model)
    own = model.state_dict()
    for key in [k for k in state if k.startswith(("head.", "pre_logits."))]:
        if key not in own or own[key].shape != state[key].shape:
            del state[key]
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(
            f"{path} is a different architecture ({len(mismatched)} tensors differ, e.g. "
            f"{mismatched[0]}); build the model with the size the weights were trained with"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("head.", "pre_logits."))]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match the model: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    return model
