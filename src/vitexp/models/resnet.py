"""BiT-style ResNet building blocks (Kolesnikov et al., "Big Transfer"), shared by the
hybrid stem (`hybrid.py`) and the BiT baseline (`bit.py`).

Both use weight-standardised convolutions and group normalisation (32 groups) instead of
batch norm; they differ in the residual block: the hybrid's ResNet-50 keeps the classic
post-activation bottleneck (as the paper's hybrid does), BiT's ResNet-v2 the
pre-activation one (He et al., "Identity Mappings in Deep Residual Networks").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32  # GroupNorm(32) throughout


class StdConv2d(nn.Conv2d):
    """Convolution with weight standardisation (Qiao et al.; BiT): zero-mean, unit-var kernels.

    `eps` is added to the kernel variance: 1e-5 in the hybrid (the paper's JAX code; timm's
    port uses 1e-8 and `vitexp.models.convert.restandardize` converts), 1e-8 in BiT (as timm's
    port of the published weights)."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (w - mean) / sqrt(var + eps) per output channel, as one batch-norm kernel over the
        # flattened kernels (biased variance, no running statistics)
        w = self.weight.reshape(1, self.out_channels, -1)
        w = F.batch_norm(w, None, None, training=True, momentum=0.0, eps=self.eps)
        w = w.reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow/JAX "SAME" padding: ceil(n / stride) outputs, the odd pixel of padding at
    the end (a 7x7/2 conv on an even size pads 2 before, 3 after; PyTorch's padding=3 pads
    3 and 3, a shift of one pixel)."""
    pads = []
    for n in reversed(x.shape[-2:]):  # F.pad takes the last dimension first
        total = max((math.ceil(n / stride) - 1) * stride + kernel_size - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class StdConv2dSame(StdConv2d):
    """`StdConv2d` with "SAME" padding (`pad_same`), as the paper's JAX hybrid and timm's
    port of it."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, **kwargs):
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=0, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size[0], self.stride[0]))


class MaxPool2dSame(nn.MaxPool2d):
    """Max pooling with "SAME" padding (padded with -inf, so padding never wins)."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__(kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride, value=-math.inf))


def gn(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (`channels` must be a multiple of 32)."""
    return nn.GroupNorm(GROUPS, channels, eps=1e-5)


class Bottleneck(nn.Module):
    """ResNet bottleneck 1x1 -> 3x3 (stride) -> 1x1, GN after each conv, projection shortcut
    (post-activation, ResNet v1.5: the hybrid stem's block). "SAME" padding, as the
    paper's JAX code."""

    def __init__(self, in_chs: int, width: int, stride: int):
        super().__init__()
        out_chs = width * 4
        self.conv1, self.gn1 = StdConv2d(in_chs, width, 1, bias=False), gn(width)
        self.conv2 = StdConv2dSame(width, width, 3, stride=stride, bias=False)
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


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (ResNet v2, BiT): GN+ReLU before each conv, the stride on
    the 3x3 conv; the projection shortcut (a strided 1x1 conv, no norm) takes the
    pre-activated input. Nothing follows the addition."""

    def __init__(self, in_chs: int, width: int, stride: int, ws_eps: float = 1e-8):
        super().__init__()
        out_chs = width * 4
        self.norm1 = gn(in_chs)
        self.conv1 = StdConv2d(in_chs, width, 1, bias=False, eps=ws_eps)
        self.norm2 = gn(width)
        self.conv2 = StdConv2d(width, width, 3, stride=stride, padding=1, bias=False, eps=ws_eps)
        self.norm3 = gn(width)
        self.conv3 = StdConv2d(width, out_chs, 1, bias=False, eps=ws_eps)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = StdConv2d(in_chs, out_chs, 1, stride=stride, bias=False, eps=ws_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = F.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        y = self.conv1(x_preact)
        y = self.conv2(F.relu(self.norm2(y)))
        y = self.conv3(F.relu(self.norm3(y)))
        return y + shortcut


def make_stages(
    block: Callable[[int, int, int], nn.Module], in_chs: int, layers: Sequence[int], width: int
) -> tuple[nn.Sequential, int]:
    """ResNet stages: stage i has `layers[i]` blocks of bottleneck width `width * 2**i`
    (output 4x that), the first block of each stage but the first with stride 2.
    `block(in_chs, width, stride)` builds one block. Returns (stages, output channels)."""
    stages = []
    for i, n in enumerate(layers):
        stage_width = width * 2**i
        blocks = [block(in_chs, stage_width, 1 if i == 0 else 2)]
        blocks += [block(stage_width * 4, stage_width, 1) for _ in range(n - 1)]
        stages.append(nn.Sequential(*blocks))
        in_chs = stage_width * 4
    return nn.Sequential(*stages), in_chs
