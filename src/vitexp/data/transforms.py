"""Train and eval pipelines (torchvision.transforms.v2) from a PIL RGB image to the model's
normalised float32 (3, H, W) input.

train: the paper's Inception crop (RandomResizedCrop) or a plain Resize, optional flip.
eval:  Resize to img_size / crop_pct, then CenterCrop(img_size); crop_pct == 1.0 resizes to
       exactly img_size (nothing is cropped, the aspect may change).
The random ops draw from torch's global RNG; the datamodule seeds it per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    return v2.Compose(
        [
            *ops,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor(),  # plain tensors collate and pickle without tv_tensors metadata
        ]
    )
