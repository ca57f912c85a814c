"""Named model sizes, and building a model from a name or from a checkpoint's record.

`SIZES` is the one table of sizes: `create_model(name)` builds from it, and every entry
is a `model=` choice of `vitexp.train` (registered by `vitexp.config`). A new size is one
line here. A model family (the ViT; BiT, the paper's CNN baseline) is a config dataclass
(a `vitexp.models.common.ModelConfig`) and the module built from it, listed in `FAMILIES`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from vitexp.models.bit import BiTConfig, ResNetV2
from vitexp.models.vit import VisionTransformer, ViTConfig


@dataclass(frozen=True)
class Family:
    config: type  # the dataclass that defines a model of the family (the `model` node)
    model: type  # nn.Module built as model(config, num_classes)


FAMILIES: dict[str, Family] = {
    "vit": Family(ViTConfig, VisionTransformer),
    "bit": Family(BiTConfig, ResNetV2),
}


def vit(width: int, depth: int, heads: int, patch: int, **fields: Any) -> tuple[str, dict]:
    """A ViT size as the paper's Table 1 gives it (MLP size: 4 x width)."""
    return "vit", dict(embed_dim=width, depth=depth, num_heads=heads, patch_size=patch, **fields)


def bit(layers: tuple[int, ...], width_factor: int = 1, **fields: Any) -> tuple[str, dict]:
    """A BiT ResNet-v2 size: blocks per stage and width multiplier (BiT's R50x1 ...)."""
    return "bit", dict(layers=list(layers), width_factor=width_factor, **fields)


# name: (family, the fields that differ from the family's defaults)
SIZES: dict[str, tuple[str, dict[str, Any]]] = {
    # the paper's Table 1 (B, L, H), and Ti and S (DeiT; Steiner et al. 2021)
    "vit_ti16": vit(192, 12, 3, 16),
    "vit_s16": vit(384, 12, 6, 16),
    "vit_b16": vit(768, 12, 12, 16),
    "vit_b32": vit(768, 12, 12, 32),
    "vit_l16": vit(1024, 24, 16, 16),
    "vit_h14": vit(1280, 32, 16, 14),
    # R50+ViT-B/16 (paper 3.1): ViT-B on the ResNet-50 feature map (stride 16), 1x1 patches
    "hybrid_r50_b16": vit(768, 12, 12, 1, stem="r50"),
    # tests: 32 px images, 4 px patches (64 tokens), D=64
    "vit_tiny_debug": vit(64, 4, 4, 4, img_size=32),
    # the embedded experiments (quickstart, Table 8, data size): the same with 8 px patches,
    # 16 tokens: 4x cheaper, so each run learns `shapes` within minutes on 2 CPU cores.
    # Position tables start at 1/sqrt(64) (big_vision's init), not the paper's 0.02: next
    # to unit-scale patch tokens, 0.02 left 4 of 18 Table-8 runs (700 steps) on the
    # position-blind plateau (val 0.29-0.41); with 0.125 the same 4 reached 0.63-0.69 (val).
    "vit_tiny_p8": vit(64, 4, 4, 8, img_size=32, pos_embed={"init_std": 0.125}),
    # the real-data studies (Fashion-MNIST, 28 px): the same model, 7 px patches, 16 tokens
    "vit_tiny_p7": vit(64, 4, 4, 7, img_size=28, pos_embed={"init_std": 0.125}),
    # Fashion-MNIST from scratch (experiment=fashion_mnist): 4 px patches, 49 tokens, GAP
    "vit_tiny_p4": vit(64, 4, 4, 4, img_size=28, pool="gap", pos_embed={"init_std": 0.125}),
    # BiT ResNet-v2 (the paper's CNN baseline; BiT-L, its Table 2 column, is R152x4)
    "bit_r50x1": bit((3, 4, 6, 3)),
    "bit_r101x1": bit((3, 4, 23, 3)),
    "bit_r152x2": bit((3, 8, 36, 3), 2),
    "bit_r152x4": bit((3, 8, 36, 3), 4),
    # tests and the embedded data-size experiment at 32 px: 2 stages of width 32, 4 x 4 map
    "bit_tiny_debug": bit((2, 2), width=32, img_size=32),
}


def model_config(name: str, **overrides: Any) -> Any:
    """The config of a named size, e.g. `model_config("vit_b16", img_size=384)`."""
    if name not in SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(SIZES)}")
    family, fields = SIZES[name]
    if isinstance(overrides.get("pos_embed"), (str, dict)) and "pos_embed" in fields:
        # a kind or some fields given: the rest (e.g. the size's init_std) stays the size's
        given = overrides["pos_embed"]
        given = {"kind": given} if isinstance(given, str) else given
        overrides = {**overrides, "pos_embed": {**fields["pos_embed"], **given}}
    return FAMILIES[family].config(name=name, **{**fields, **overrides})


def family_of(cfg: Any) -> str:
    """The family name of a config (its dataclass)."""
    return next(name for name, f in FAMILIES.items() if isinstance(cfg, f.config))


def build_model(cfg: Any, num_classes: int) -> nn.Module:
    """The model of a config (of any family), freshly initialised."""
    return FAMILIES[family_of(cfg)].model(cfg, num_classes=num_classes)


def create_model(name: str, num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """`create_model("vit_b16", img_size=384, num_classes=10, pos_embed="learned_2d")`."""
    return build_model(model_config(name, **overrides), num_classes)


def model_record(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint keeps to rebuild `model`: plain data only (weights_only loads)."""
    return {
        "model_family": family_of(model.cfg),
        "model_config": asdict(model.cfg),
        "num_classes": model.num_classes,
    }


def config_from_record(record: dict[str, Any]) -> tuple[Any, int]:
    """(config, num_classes) of a checkpoint's record. Records of checkpoint format 1 (no family,
    num_classes inside the config, mean/std beside it) read the same."""
    fields = dict(record["model_config"])
    num_classes = record.get("num_classes", fields.pop("num_classes", None))
    fields.pop("num_classes", None)
    family = FAMILIES[record.get("model_family", "vit")]
    cfg = family.config(**fields)
    if "mean" not in fields and "mean" in record:  # format 1 kept them beside the config
        cfg = replace(cfg, mean=list(record["mean"]), std=list(record["std"]))
    if "name" not in fields and "model_name" in record:  # ... and the size's name
        cfg = replace(cfg, name=record["model_name"])
    if getattr(cfg, "stem", None) == "r50" and record.get("format", 1) < 3:
        warnings.warn(
            "this hybrid checkpoint was trained with the R50 stem's earlier symmetric padding; "
            'vitexp now pads "SAME" as the paper (one pixel shift): fine-tuning from it '
            "adapts, but its own predictions differ slightly from the run's",
            stacklevel=2,
        )
    return cfg, int(num_classes)
