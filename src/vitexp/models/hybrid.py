"""Hybrid stem: a ResNet-50 feature map, cut into (1 x 1) patches, feeds the Transformer.

The paper (section 3.1, "Hybrid Architecture") uses its BiT-style ResNet: group norm and
weight-standardised convolutions, with stage 4 removed and its blocks moved to stage 3
(layers 3, 4, 9), so the feature map has stride 16 and 1024 channels: at 224 px that is a
14 x 14 map, i.e. 196 tokens, as for ViT-B/16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitexp.models.patch_embed import PatchEmbed, Size2d, check_input_size, to_2tuple

STRIDE = 16  # stem (4) x stage strides (1, 2, 2)
LAYERS = (3, 4, 9)
WIDTH = 64


class StdConv2d(nn.Conv2d):
    """Convolution with weight standardisation (Qiao et al.; BiT): zero-mean, unit-var kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (w - mean) / sqrt(var + eps) per output channel, as one batch-norm kernel over the
        # flattened kernels (biased variance, no running statistics)
        w = self.weight.reshape(1, self.out_channels, -1)
        w = F.batch_norm(w, None, None, training=True, momentum=0.0, eps=1e-5)
        w = w.reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-5)


class Bottleneck(nn.Module):
    """ResNet bottleneck 1x1 -> 3x3 (stride) -> 1x1, GN after each conv, projection shortcut."""

    def __init__(self, in_chs: int, width: int, stride: int):
        super().__init__()
        out_chs = width * 4
        self.conv1, self.gn1 = StdConv2d(in_chs, width, 1, bias=False), gn(width)
        self.conv2 = StdConv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.gn2 = gn(width)
        self.conv3, self.gn3 = StdConv2d(width, out_chs, 1, bias=False), gn(out_chs)
        nn.init.zeros_(self.gn3.weight)  # each residual branch starts as identity
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                StdConv2d(in_chs, out_chs, 1, stride=stride, bias=False), gn(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(shortcut + y)


class ResNetStages(nn.Module):
    """Root (7x7/2 conv, 3x3/2 pool), stages of 3, 4, 9 blocks: (B,3,H,W) -> (B,1024,H/16,W/16)."""

    def __init__(self, in_chans: int = 3, layers: Sequence[int] = LAYERS, width: int = WIDTH):
        super().__init__()
        self.root = nn.Sequential(
            StdConv2d(in_chans, width, 7, stride=2, padding=3, bias=False),
            gn(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, in_chs = [], width
        for i, n in enumerate(layers):
            stage_width = width * 2**i
            blocks = [Bottleneck(in_chs, stage_width, 1 if i == 0 else 2)]
            blocks += [Bottleneck(stage_width * 4, stage_width, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_chs = stage_width * 4
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.root(x))


class HybridEmbed(nn.Module):
    """Image -> ResNet feature map -> patch embedding of the map (patch_size 1 in the paper).

    Exposes the same interface as `PatchEmbed` (grid_size, img_size, proj, set_img_size),
    so class token, every position embedding and `resize` work unchanged.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 1,
        patch_stride: int | Sequence[int] | None = None,
        in_chans: int = 3,
        embed_dim: int = 768,
    ):
        super().__init__()
        self.backbone = ResNetStages(in_chans)
        self.img_size = self._check(to_2tuple(img_size, "img_size"))
        self.embed = PatchEmbed(
            self.feature_size(self.img_size),
            patch_size,
            patch_stride,
            self.backbone.out_channels,
            embed_dim,
        )
        self.proj = self.embed.proj

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

    @property
    def grid_size(self) -> Size2d:
        return self.embed.grid_size

    def set_img_size(self, img_size: int | Sequence[int]) -> None:
        img_size = self._check(to_2tuple(img_size, "img_size"))
        self.embed.set_img_size(self.feature_size(img_size))
        self.img_size = img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.img_size)
        return self.embed(self.backbone(x))
