"""Train and eval pipelines (torchvision.transforms.v2) from a PIL RGB image to the model's
normalised float32 (3, H, W) input.

train: the paper's Inception crop (RandomResizedCrop) or a plain Resize, optional flip.
eval:  Resize to img_size / crop_pct, then CenterCrop(img_size); crop_pct == 1.0 resizes to
       exactly img_size (nothing is cropped, the aspect may change).
The random ops draw from torch's global RNG; the datamodule seeds it per sample, only where
the pipeline has any (`is_random`). The last step, pixels to normalised floats, is one fused
op: v2's ToImage + ToDtype + Normalize cost ~0.4 ms an image, which on small images was
most of a CPU run's time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from vitexp.config import AugmentConfig


def build_transforms(
    augment: AugmentConfig,
    img_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
) -> v2.Compose:
    """The pipeline for one split; img_size is (height, width)."""
    size = (int(img_size[0]), int(img_size[1]))
    if train:
        ops: list = [
            v2.RandomResizedCrop(size, scale=(augment.scale_min, 1.0), antialias=True)
            if augment.random_resized_crop
            else v2.Resize(size, antialias=True)
        ]
        if augment.hflip:
            ops.append(v2.RandomHorizontalFlip())
    elif augment.crop_pct >= 1.0:
        ops = [v2.Resize(size, antialias=True)]
    else:
        # the shorter side becomes max(H, W) / crop_pct, so both sides of the crop fit
        shorter = max(math.floor(max(size) / augment.crop_pct), max(size))
        ops = [v2.Resize(shorter, antialias=True), v2.CenterCrop(size)]
    pipeline = v2.Compose([*ops, ToNormalizedTensor(mean, std)])
    pipeline.is_random = train and (augment.random_resized_crop or augment.hflip)
    return pipeline


class ToNormalizedTensor:
    """PIL image (or uint8 (C, H, W) tensor) -> plain float32 (3, H, W) tensor,
    (x / 255 - mean) / std per channel: what ToImage, ToDtype(scale) and Normalize do."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            x = img.as_subclass(torch.Tensor)
        else:
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)
        return x.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)
