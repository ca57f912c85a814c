"""BiT ResNet-v2 (Kolesnikov et al., "Big Transfer (BiT)", ECCV 2020): the paper's CNN
baseline (ViT paper, section 4.1 and Table 2: BiT-L is a ResNet152x4).

A pre-activation ResNet (He et al., "Identity Mappings in Deep Residual Networks") with
group normalisation (32 groups) and weight-standardised convolutions instead of batch norm:

    root:   7x7/2 conv, zero padding 1, 3x3/2 max pool (no norm: the blocks pre-activate)
    stages: pre-activation bottlenecks, `layers[i]` of them in stage i, stride 2 from stage 2
    head:   GN + ReLU, global average pooling, a linear layer

Sizes are ResNet{depth}x{width factor} (`bit_r50x1`, ...; `vitexp.models.factory.SIZES`).
The parameter names differ from timm's `resnetv2_*_bit` models; `convert.from_timm`
imports those (same logits).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitexp.models.common import ModelConfig
from vitexp.models.patch_embed import Size2d, to_2tuple
from vitexp.models.resnet import GROUPS, PreActBottleneck, StdConv2d, gn, make_stages

WS_EPS = 1e-8  # weight standardisation's variance epsilon in BiT (timm's port of its weights)


@dataclass
class BiTConfig(ModelConfig):
    """Everything that defines a BiT ResNet-v2: the `model` config node of the `bit_*`
    sizes, saved with every checkpoint and compared when one is loaded. Checked on
    construction; `ValueError` names the field.

    img_size: input resolution, int or (height, width). The network runs at any size; this
        is the size the data is prepared at (the paper: 224 to pretrain).
    layers: bottleneck blocks per stage (ResNet-50: 3, 4, 6, 3); fewer stages give a
        smaller total stride (2 ** (len(layers) + 1)), e.g. for 32 px images.
    width: channels of the root conv and bottleneck width of the first stage, before the
        width factor (64 in every BiT); stage i's blocks output 4 * width * 2**i channels.
    width_factor: BiT's width multiplier (the x1, x2, x4 of R50x1 ... R152x4).
    head_bias_init: every logit's bias at construction (as the ViT's: big_vision's
        bit_i21k config starts at -10 with the sigmoid loss). Not architecture: fine-tuning's
        new head starts at zero, and neither loading nor resuming compares it.
    mean, std: the input normalisation the model expects (BiT's: [-1, 1]).
    """

    name: str = "bit"  # the size it was made from (vitexp.models.factory.SIZES), for records
    img_size: Any = 224
    in_chans: int = 3
    layers: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    width: int = 64
    width_factor: int = 1
    head_bias_init: float = 0.0

    # what must agree between a pretrained checkpoint and the model fine-tuned from it
    ARCHITECTURE = ("in_chans", "layers", "width", "width_factor")
    # ... and what a resumed run must also keep
    RESUME = (*ARCHITECTURE, "img_size")

    def __post_init__(self) -> None:
        self.img_size = to_2tuple(self.img_size, "img_size")
        if min(self.img_size) < 1:
            raise ValueError(f"img_size={list(self.img_size)} must be >= 1")
        layers = list(self.layers) if isinstance(self.layers, Sequence) else None
        if not layers or not all(isinstance(n, int) and n >= 1 for n in layers):
            raise ValueError(
                f"layers={self.layers!r} must be a non-empty list of block counts >= 1"
            )
        self.layers = [int(n) for n in layers]
        for key in ("in_chans", "width", "width_factor"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be > 0")
        if (self.width * self.width_factor) % GROUPS:
            raise ValueError(
                f"width={self.width} x width_factor={self.width_factor} must be a multiple of "
                f"{GROUPS} (GroupNorm's {GROUPS} groups)"
            )
        if not math.isfinite(self.head_bias_init):
            raise ValueError(f"head_bias_init={self.head_bias_init!r} must be a finite number")
        self.check_mean_std(self.in_chans)

    @property
    def stride(self) -> int:
        """Total stride: root conv and pool (4), then 2 per stage after the first."""
        return 2 ** (len(self.layers) + 1)

    def feature_size(self, img_size: Size2d) -> Size2d:
        """(h, w) of the last feature map for an input of `img_size`: each stride-2 layer
        (padded as BiT pads) maps a side n to ceil(n / 2), so it never drops below 1."""
        h, w = img_size
        for _ in range(len(self.layers) + 1):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w


class ResNetV2(nn.Module):
    """BiT classifier: `ResNetV2(BiTConfig(...), num_classes)`, or the config's fields as
    keywords (`ResNetV2(layers=[2, 2], width=32, num_classes=10)`).

    Has the interface of `VisionTransformer` that training, few-shot evaluation and
    fine-tuning use: `cfg`, `num_classes`, `img_size`, `grid_size` (here: the last feature
    map), `forward_features` (the feature map, (B, C, h, w)), `forward_head(x, pre_logits)`,
    `reset_classifier`, `resize`, `no_weight_decay`, `layer_ids`.
    """

    def __init__(self, cfg: BiTConfig | None = None, num_classes: int = 1000, **overrides: Any):
        super().__init__()
        if cfg is None:
            cfg = BiTConfig(**overrides)
        elif overrides:
            cfg = replace(cfg, **overrides)
        self.cfg = cfg
        self.num_classes = num_classes
        chs = cfg.width * cfg.width_factor
        self.stem = nn.Sequential(
            OrderedDict(
                conv=StdConv2d(cfg.in_chans, chs, 7, stride=2, padding=3, bias=False, eps=WS_EPS),
                # BiT's padding: zeros (the conv output is not activated yet), then the pool
                pad=nn.ConstantPad2d(1, 0.0),
                pool=nn.MaxPool2d(3, stride=2),
            )
        )
        block = partial(PreActBottleneck, ws_eps=WS_EPS)
        self.stages, self.num_features = make_stages(block, chs, cfg.layers, chs)
        self.norm = gn(self.num_features)  # the pre-activation of the head (GN + ReLU)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """He (fan-out) init of the convs, unit GN scales, zero head weights and the head
        bias at `head_bias_init` (as the ViT's)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, self.cfg.head_bias_init)

    @property
    def img_size(self) -> Size2d:
        return self.cfg.img_size

    @property
    def grid_size(self) -> Size2d:
        """(h, w) of the last feature map at `img_size`."""
        return self.cfg.feature_size(self.cfg.img_size)

    # --- forward --------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map after the final GN + ReLU, (B, C, h, w)."""
        return F.relu(self.norm(self.stages(self.stem(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, then the head. `pre_logits=True` stops before the head
        (the features that few-shot linear evaluation uses)."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # --- fine-tuning ----------------------------------------------------------------------
    def resize(self, img_size: int | Sequence[int]) -> None:
        """Run at a new resolution: a CNN has nothing to resample, only the record changes."""
        self.cfg = replace(self.cfg, img_size=img_size)

    def reset_classifier(self, num_classes: int, keep_pre_logits: bool = False) -> None:
        """New zero-initialised head for `num_classes` (BiT's fine-tuning head).
        `keep_pre_logits` is accepted for the ViT's interface: BiT has no pre-logits layer."""
        device = next(self.parameters()).device
        self.head = (
            nn.Linear(self.num_features, num_classes, device=device)
            if num_classes
            else nn.Identity()
        )
        if num_classes:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.num_classes = num_classes

    def no_weight_decay(self) -> set[str]:
        """No embeddings here (the optimizer already skips norms and biases, the 1-D ones)."""
        return set()

    def layer_ids(self) -> dict[str, int]:
        """Each parameter's depth for layer-wise lr decay (`optim.layer_decay`), here because
        only the model knows where its parameters sit: 0 the root conv, then one step per
        residual block counted across the stages (1 ... sum(layers)), and sum(layers) + 1
        the head with its pre-activation norm."""
        layers = self.cfg.layers
        first = [1 + sum(layers[:i]) for i in range(len(layers))]  # each stage's first block
        ids = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if parts[0] == "stem":
                ids[name] = 0
            elif parts[0] == "stages":
                ids[name] = first[int(parts[1])] + int(parts[2])
            else:
                ids[name] = sum(layers) + 1
        return ids
