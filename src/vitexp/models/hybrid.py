"""Hybrid stem: a ResNet-50 feature map, cut into (1 x 1) patches, feeds the Transformer.

The paper (section 3.1, "Hybrid Architecture") uses its BiT-style ResNet: group norm and
weight-standardised convolutions, with stage 4 removed and its blocks moved to stage 3
(layers 3, 4, 9), so the feature map has stride 16 and 1024 channels: at 224 px that is a
14 x 14 map, i.e. 196 tokens, as for ViT-B/16. Its blocks are those of `resnet.py`, shared
with the BiT baseline. Convolutions and pooling pad as the paper's JAX code ("SAME": the
odd pixel at the end), so timm's `vit_*_r50_*` models compute the same thing
(`vitexp.export`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vitexp.models.patch_embed import PatchEmbed, Size2d, check_input_size, to_2tuple
from vitexp.models.resnet import Bottleneck, MaxPool2dSame, StdConv2dSame, gn, make_stages

STRIDE = 16  # stem (4) x stage strides (1, 2, 2)
LAYERS = (3, 4, 9)
WIDTH = 64


class ResNetStages(nn.Module):
    """Root (7x7/2 conv, 3x3/2 pool), stages of 3, 4, 9 blocks: (B,3,H,W) -> (B,1024,H/16,W/16)."""

    def __init__(self, in_chans: int = 3, layers: Sequence[int] = LAYERS, width: int = WIDTH):
        super().__init__()
        self.root = nn.Sequential(
            StdConv2dSame(in_chans, width, 7, stride=2, bias=False),
            gn(width),
            nn.ReLU(inplace=True),
            MaxPool2dSame(3, stride=2),
        )
        self.stages, self.out_channels = make_stages(Bottleneck, width, layers, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.root(x))


class HybridEmbed(PatchEmbed):
    """Image -> ResNet feature map -> patch embedding of the map (patch_size 1 in the paper).

    A `PatchEmbed` whose input is the feature map, so class token, every position embedding
    and `resize` work unchanged; `img_size` stays in pixels, `grid_size` counts map cells.
    Its weights are named as timm's hybrid's (`backbone.*` aside, `proj`).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 1,
        patch_stride: int | Sequence[int] | None = None,
        in_chans: int = 3,
        embed_dim: int = 768,
    ):
        img_size = self._check(to_2tuple(img_size, "img_size"))
        backbone = ResNetStages(in_chans)
        map_size = self.feature_size(img_size)
        super().__init__(map_size, patch_size, patch_stride, backbone.out_channels, embed_dim)
        self.backbone = backbone
        # parameters in the order they compute, as before format 4: a resumed optimizer's
        # state is matched to them by position
        proj = self.proj
        del self.proj
        self.proj = proj
        self.img_size = img_size

    @staticmethod
    def _check(img_size: Size2d) -> Size2d:
        if any(s % STRIDE for s in img_size):
            raise ValueError(
                f"hybrid stem needs an image size divisible by {STRIDE} (the ResNet's stride), "
                f"got {img_size}"
            )
        return img_size

    @staticmethod
    def feature_size(img_size: Size2d) -> Size2d:
        return (img_size[0] // STRIDE, img_size[1] // STRIDE)

    def set_img_size(self, img_size: int | Sequence[int]) -> None:
        img_size = self._check(to_2tuple(img_size, "img_size"))
        super().set_img_size(self.feature_size(img_size))
        self.img_size = img_size

    def set_patch_size(
        self, patch_size: int | Sequence[int], img_size: int | Sequence[int] | None = None
    ) -> None:
        """Refused: the patches are cells of the CNN map, not pixels, and the ResNet that
        makes the map fixes their size."""
        raise ValueError(
            f"patch_size={patch_size}: the hybrid (stem=r50) has 1x1 patches on the CNN "
            "feature map; its patch size cannot change"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.img_size)
        x = self.proj(self.backbone(x))  # (B, D, rows, cols)
        return x.flatten(2).transpose(1, 2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints of format < 4 also hold the projection as embed.proj (a PatchEmbed
        # inside, registered twice): the same tensors as proj
        for name in ("weight", "bias"):
            state_dict.pop(f"{prefix}embed.proj.{name}", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
