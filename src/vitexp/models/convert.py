"""Weight import from timm: a live timm `VisionTransformer` or BiT `ResNetV2`, or a
timm-format weight file.

The paper's weights are published in timm format (e.g. `vit_base_patch16_224.augreg_in21k`
as `model.safetensors`, or the older `jx_vit_*.pth` files that still carry the pre-logits
layer; the R50+ViT-B/16 hybrid's as `vit_base_r50_s16_384.orig_in21k_ft_in1k`; BiT's as
`resnetv2_50x1_bit.goog_in21k`). Original JAX `.npz` files load into timm
first (`timm_model.load_pretrained(path)`), then through `from_timm`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitexp.models.bit import WS_EPS, BiTConfig, ResNetV2
from vitexp.models.convert_eva import eva_fields
from vitexp.models.pos_embed import resample_grid, square_grid
from vitexp.models.vit import VisionTransformer, ViTConfig

# The hybrid's ResNet, vitexp's names -> timm's (vitexp.models.hybrid -> timm's resnetv2
# under patch_embed.backbone), and timm's kernel-standardisation eps (vitexp's: each
# StdConv2d's own, 1e-5 as the paper's JAX code).
HYBRID_NAMES = [  # (vitexp, timm); {} is a block or stage index
    ("root.0", "stem.conv"),
    ("root.1", "stem.norm"),
    ("stages.{}.{}", "stages.{}.blocks.{}"),
    ("gn{}", "norm{}"),
    ("downsample.0", "downsample.conv"),
    ("downsample.1", "downsample.norm"),
]
TIMM_HYBRID_WS_EPS = 1e-8


def rename_hybrid(key: str, to_timm: bool) -> str:
    """A hybrid backbone weight's name in timm's (`to_timm`) or vitexp's naming."""
    for ours, theirs in HYBRID_NAMES:
        old, new = (ours, theirs) if to_timm else (theirs, ours)
        pattern = re.escape(f".{old}.").replace(re.escape("{}"), r"(\d+)")
        groups = [f"\\{i + 1}" for i in range(old.count("{}"))]
        key = re.sub(pattern, f".{new.format(*groups)}.", key)
    return key


def restandardize(weight: torch.Tensor, eps: float, new_eps: float) -> torch.Tensor:
    """A kernel that weight standardisation with `new_eps` maps to what standardisation
    with `eps` makes of `weight`: the standardised kernel w_hat (per output channel,
    variance v < 1), scaled by a = sqrt(new_eps / (1 - v)), so that
    a * w_hat / sqrt(a^2 v + new_eps) = w_hat exactly."""
    w = weight.double().flatten(1)
    var = w.var(dim=1, unbiased=False, keepdim=True)
    w_hat = (w - w.mean(dim=1, keepdim=True)) / torch.sqrt(var + eps)
    one_minus_v = eps / (var + eps)  # 1 - var(w_hat), without the cancellation
    return (w_hat * torch.sqrt(new_eps / one_minus_v)).reshape_as(weight).to(weight.dtype)


# timm options whose computation vitexp's ViT does not have (name -> value meaning "off").
_UNSUPPORTED = {
    "num_reg_tokens": 0,
    "pool_include_prefix": False,
}


def _check_supported(timm_model: nn.Module) -> None:
    """Refuse timm features that would silently change the computation."""
    name = type(timm_model).__name__
    if name != "VisionTransformer":
        raise ValueError(
            "from_timm converts timm VisionTransformer, Eva (RoPE-ViT) and ResNetV2 (BiT) "
            f"models, got {name}"
        )
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
    for part in ("attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm"):
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
    if type(timm_model.patch_embed).__name__ == "HybridEmbed":
        problems += _hybrid_problems(timm_model.patch_embed.backbone)
    if problems:
        raise ValueError(
            f"timm model uses {', '.join(problems)}, which vitexp's ViT does not implement; "
            "only the paper's architecture (class token or GAP, LayerNorm, GELU, the R50 "
            "hybrid stem) converts"
        )


def _hybrid_problems(backbone: nn.Module) -> list[str]:
    """What in a timm hybrid's CNN differs from vitexp's R50 stem (`models.hybrid`)."""
    from vitexp.models.hybrid import LAYERS, WIDTH

    if type(backbone).__name__ != "ResNetV2":
        return [f"a {type(backbone).__name__} hybrid backbone"]
    layers = tuple(len(stage.blocks) for stage in backbone.stages)
    stem = backbone.stem
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    blocks = {type(b).__name__ for stage in backbone.stages for b in stage.blocks}
    found = {
        "layers": layers,
        "width": getattr(getattr(stem, "conv", None), "out_channels", None),
        "blocks": blocks,
        "stem": [type(m).__name__ for m in stem.children()],
        "convs": {(type(m).__name__, getattr(m, "eps", None)) for m in convs},
    }
    want = {
        "layers": LAYERS,
        "width": WIDTH,
        "blocks": {"Bottleneck"},
        "stem": ["StdConv2dSame", "GroupNormAct", "MaxPool2dSame"],
        "convs": {("StdConv2dSame", TIMM_HYBRID_WS_EPS)},
    }
    return [f"a hybrid backbone with {key}={found[key]}" for key in want if found[key] != want[key]]


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
    hybrid = type(embed).__name__ == "HybridEmbed"
    pre_logits = getattr(timm_model, "pre_logits", None)
    representation_size = None
    if pre_logits is not None and isinstance(getattr(pre_logits, "fc", None), nn.Linear):
        representation_size = pre_logits.fc.out_features
    in_chans = embed.backbone.stem.conv.in_channels if hybrid else embed.proj.in_channels
    return ViTConfig(
        **shared_fields(timm_model),
        patch_stride=tuple(embed.proj.stride),
        in_chans=in_chans,
        stem="r50" if hybrid else "patch",
        representation_size=representation_size,
        pos_embed="learned_1d" if timm_model.pos_embed is not None else "none",
        layer_scale_init=_layer_scale_init(block),
    )


def eva_config_from_timm(timm_model: nn.Module) -> ViTConfig:
    """The ViTConfig that computes what a timm Eva RoPE ViT (RoPE-ViT's models) computes."""
    return ViTConfig(**shared_fields(timm_model), **eva_fields(timm_model))


def shared_fields(timm_model: nn.Module) -> dict[str, Any]:
    """The ViTConfig fields that timm's VisionTransformer and Eva keep alike."""
    block = timm_model.blocks[0]
    embed = timm_model.patch_embed
    return {
        "name": (getattr(timm_model, "pretrained_cfg", None) or {}).get("architecture", "timm"),
        "img_size": tuple(embed.img_size),
        "patch_size": tuple(embed.patch_size),
        "embed_dim": timm_model.embed_dim,
        "depth": len(timm_model.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / timm_model.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "pool": "cls" if timm_model.global_pool == "token" else "gap",
        "class_token": timm_model.cls_token is not None,
        "fc_norm": not isinstance(timm_model.fc_norm, nn.Identity),
        "norm_eps": block.norm1.eps,
    }


def _layer_scale_init(block: nn.Module) -> float | None:
    """LayerScale's init of a timm ViT block (any positive value: the weights replace it)."""
    gamma = getattr(getattr(block, "ls1", None), "gamma", None)
    return None if gamma is None else 1e-5


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
            out["encoder." + re.sub(r"\.gamma_(\d)$", r".ls\1.gamma", key)] = value  # Eva's
        elif key == "rope.freqs":  # RoPE-Mixed's learned frequencies (timm's Eva)
            out["encoder.rope.freqs"] = value
        elif key.startswith("pre_logits.fc."):
            out[key.replace("pre_logits.fc.", "pre_logits.0.")] = value
        elif re.match(r"^(cls_token|patch_embed\.proj\.|head\.|fc_norm\.)", key):
            out[key] = value
        elif key.startswith("patch_embed.backbone."):
            key = rename_hybrid(key, to_timm=False)
            if value.dim() == 4:  # a weight-standardised conv: to the eps of vitexp's
                conv = model.get_submodule(key.removesuffix(".weight"))
                value = restandardize(value, TIMM_HYBRID_WS_EPS, conv.eps)
            out[key] = value
        else:
            raise ValueError(f"timm weight {key!r} has no place in vitexp's ViT")
    return out


def from_timm(timm_model: nn.Module) -> VisionTransformer | ResNetV2:
    """A vitexp model with the same weights and the same logits as a timm ViT (or a timm
    BiT ResNet-v2: `bit_from_timm`)."""
    if type(timm_model).__name__ == "ResNetV2":
        return bit_from_timm(timm_model)
    if type(timm_model).__name__ == "Eva":
        config = eva_config_from_timm(timm_model)
    else:
        config = config_from_timm(timm_model)
    model = VisionTransformer(config, num_classes=timm_model.num_classes)
    state = convert_timm_state_dict(
        timm_model.state_dict(),
        model,
        grid=tuple(timm_model.patch_embed.grid_size),
        no_embed_class=timm_model.no_embed_class,
    )
    model.load_state_dict(state)
    return model.train(timm_model.training)


# --- BiT ResNet-v2 ---------------------------------------------------------------------
def _bit_problems(timm_model: nn.Module) -> list[str]:
    """What in a timm ResNetV2 computes otherwise than vitexp's BiT."""
    problems = []
    if isinstance(timm_model.norm, nn.Identity):
        problems.append("preact=False")
    stem = dict(timm_model.stem.named_children())
    conv, pad, pool = stem.get("conv"), stem.get("pad"), stem.get("pool")
    if not (
        list(stem) == ["conv", "pad", "pool"]
        and isinstance(conv, nn.Conv2d)
        and (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
        and isinstance(pad, nn.ConstantPad2d)
        and pad.padding == (1, 1, 1, 1)
        and pad.value == 0.0
        and isinstance(pool, nn.MaxPool2d)
        and (pool.kernel_size, pool.stride, pool.padding) in ((3, 2, 0), ((3, 3), (2, 2), 0))
    ):
        problems.append(f"stem {', '.join(stem)} (BiT's is stem_type='fixed')")
    convs = [m for m in timm_model.modules() if isinstance(m, nn.Conv2d)]
    convs = [m for m in convs if m is not timm_model.head.fc]
    if any(type(m).__name__ != "StdConv2d" for m in convs):
        problems.append(f"conv layer {next(type(m).__name__ for m in convs)}")
    elif any(abs(m.eps - WS_EPS) > 1e-12 for m in convs):
        problems.append(f"weight standardisation eps={convs[0].eps:g} (BiT's: {WS_EPS:g})")
    norms = [m for m in timm_model.modules() if isinstance(m, nn.GroupNorm)]
    for m in [timm_model.norm, *norms]:
        if (
            type(m).__name__ != "GroupNormAct"
            or (m.num_groups, m.eps) != (32, 1e-5)
            or type(m.act) is not nn.ReLU
        ):
            groups = getattr(m, "num_groups", None)
            problems.append(f"norm layer {type(m).__name__}" + (f"({groups})" if groups else ""))
            break
    pool_type = getattr(timm_model.head.global_pool, "pool_type", None)
    if pool_type != "avg":
        problems.append(f"global_pool={pool_type!r}")
    stem_chs = conv.out_channels if isinstance(conv, nn.Conv2d) else None
    for i, stage in enumerate(timm_model.stages):
        for j, block in enumerate(stage.blocks):
            width = (stem_chs or 0) * 2**i
            stride = 2 if i > 0 and j == 0 else 1
            if type(block).__name__ != "PreActBottleneck":
                problems.append(f"{type(block).__name__} blocks")
            elif (
                block.conv1.out_channels != width
                or block.conv3.out_channels != 4 * width
                or block.conv2.stride != (stride, stride)
                or block.conv2.dilation != (1, 1)
                or block.conv2.groups != 1
            ):
                problems.append(
                    f"stages.{i}.blocks.{j}: widths, stride, dilation or groups other than "
                    "BiT's (output_stride, bottle_ratio, channels or groups changed)"
                )
            elif (block.downsample is not None) != (j == 0) or (
                j == 0 and type(block.downsample).__name__ != "DownsampleConv"
            ):
                kind = type(block.downsample).__name__
                problems.append(f"stages.{i}.blocks.{j}.downsample {kind}")
            elif j == 0 and not isinstance(block.downsample.norm, nn.Identity):
                problems.append(f"stages.{i}.blocks.0.downsample with a norm layer")
            if problems:
                return problems
    return problems


def bit_config_from_timm(timm_model: nn.Module) -> BiTConfig:
    """The BiTConfig that computes what a timm BiT `ResNetV2` computes."""
    problems = _bit_problems(timm_model)
    if problems:
        raise ValueError(
            f"timm model uses {', '.join(problems)}, which vitexp's BiT does not implement; "
            "only BiT's architecture (resnetv2_*_bit: pre-activation bottlenecks, GroupNorm, "
            "weight standardisation, the fixed stem) converts"
        )
    chs = timm_model.stem.conv.out_channels
    width_factor = chs // 64 if chs % 64 == 0 else 1
    pretrained = getattr(timm_model, "pretrained_cfg", None) or {}
    in_chans = timm_model.stem.conv.in_channels
    norm = {
        key: list(pretrained[key])
        for key in ("mean", "std")
        if len(pretrained.get(key) or ()) == in_chans
    }
    return BiTConfig(
        name=pretrained.get("architecture", "timm"),
        img_size=tuple(pretrained.get("input_size", (in_chans, 224, 224))[1:]),
        in_chans=in_chans,
        layers=[len(stage.blocks) for stage in timm_model.stages],
        width=chs // width_factor,
        width_factor=width_factor,
        **norm,
    )


def convert_timm_bit_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm BiT ResNetV2 state dict to vitexp's names (the 1x1-conv head becomes
    the linear head)."""
    out = {}
    for key, value in state_dict.items():
        block = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", key)
        if key.startswith(("stem.conv.", "norm.")):
            out[key] = value
        elif block:
            rest = block[3].replace("downsample.conv.", "downsample.")
            out[f"stages.{block[1]}.{block[2]}.{rest}"] = value
        elif key in ("head.fc.weight", "head.fc.bias"):
            out[key.replace("head.fc.", "head.")] = value.flatten(1) if value.ndim == 4 else value
        else:
            raise ValueError(f"timm weight {key!r} has no place in vitexp's BiT ResNet-v2")
    return out


def bit_from_timm(timm_model: nn.Module) -> ResNetV2:
    """A vitexp BiT with the same weights and the same logits as a timm BiT ResNetV2."""
    model = ResNetV2(bit_config_from_timm(timm_model), num_classes=timm_model.num_classes)
    model.load_state_dict(convert_timm_bit_state_dict(timm_model.state_dict()))
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


def load_timm_weights(
    model: VisionTransformer | ResNetV2, path: str | Path
) -> VisionTransformer | ResNetV2:
    """Load a timm-format weight file into `model` (built with the matching size, e.g.
    `create_model("vit_b16", img_size=384, num_classes=10)`, or `create_model("bit_r50x1")`
    for a `resnetv2_50x1_bit` file).

    Position embeddings are resampled to the model's resolution; a head whose class count
    differs (a fine-tune) is left as the model's own zero-initialised head, and a pre-logits
    layer the model lacks is dropped, as the paper does when fine-tuning.
    """
    if isinstance(model, ResNetV2):
        state = convert_timm_bit_state_dict(read_state_dict(path))
    else:
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
