"""Train and eval pipelines (torchvision.transforms.v2) from a PIL RGB image to the model's
normalised float32 (3, H, W) input.

train: the paper's Inception crop (RandomResizedCrop) or, with it off, evaluation's
       framing (a model tested on a framing it never saw loses points: 11 on Fashion-MNIST
       at crop_pct 0.875), optional flip, optional RandAugment (AugReg's per-image
       augmentation).
eval:  Resize to img_size / crop_pct, then CenterCrop(img_size); crop_pct == 1.0 resizes to
       exactly img_size (nothing is cropped, the aspect may change).
batch: `BatchMix`, MixUp or CutMix of a whole training batch with soft targets (AugReg's
       per-batch augmentation), applied by the LightningModule on the device.
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

from vitexp.data.config import AugmentConfig


def build_transforms(
    augment: AugmentConfig,
    img_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
) -> v2.Compose:
    """The pipeline for one split; img_size is (height, width)."""
    size = (int(img_size[0]), int(img_size[1]))
    if train and augment.random_resized_crop:
        ops: list = [v2.RandomResizedCrop(size, scale=(augment.scale_min, 1.0), antialias=True)]
    else:  # without the random crop, training frames an image as evaluation does
        ops = framing(size, augment.crop_pct)
    if train and augment.hflip:
        ops.append(v2.RandomHorizontalFlip())
    r = augment.randaugment
    if train and r.num_ops:
        ops.append(v2.RandAugment(r.num_ops, r.magnitude, r.num_magnitude_bins))
    pipeline = v2.Compose([*ops, ToNormalizedTensor(mean, std)])
    pipeline.is_random = train and (
        augment.random_resized_crop or augment.hflip or augment.randaugment.num_ops > 0
    )
    return pipeline


def framing(size: tuple[int, int], crop_pct: float) -> list:
    """Evaluation's framing (timm's): resize to img_size / crop_pct, center crop img_size;
    crop_pct 1.0 resizes to exactly img_size (nothing is cropped, the aspect may change)."""
    if crop_pct >= 1.0:
        return [v2.Resize(size, antialias=True)]
    # the shorter side becomes max(H, W) / crop_pct, so both sides of the crop fit
    shorter = max(math.floor(max(size) / crop_pct), max(size))
    return [v2.Resize(shorter, antialias=True), v2.CenterCrop(size)]


class BatchMix:
    """MixUp or CutMix on a training batch: (images, int labels) -> (mixed images, soft
    targets (B, classes)); with probability 1 - mix_prob the batch only becomes one-hot.
    torchvision's v2.MixUp / v2.CutMix do the mixing; their random draws (and the choice
    here) come from torch's CPU generator, which the run seeds and every checkpoint
    saves, so a resumed run mixes the same way."""

    def __init__(self, augment: AugmentConfig, num_classes: int) -> None:
        self.num_classes = num_classes
        self.mix_prob = augment.mix_prob
        self.choices: list = []
        self.p: list[float] = []
        if augment.mixup_alpha > 0:
            self.choices.append(v2.MixUp(alpha=augment.mixup_alpha, num_classes=num_classes))
            self.p.append(1 - augment.switch_prob if augment.cutmix_alpha > 0 else 1.0)
        if augment.cutmix_alpha > 0:
            self.choices.append(v2.CutMix(alpha=augment.cutmix_alpha, num_classes=num_classes))
            self.p.append(augment.switch_prob if augment.mixup_alpha > 0 else 1.0)

    @classmethod
    def from_config(cls, augment: AugmentConfig, num_classes: int) -> BatchMix | None:
        """None when the config mixes nothing."""
        return cls(augment, num_classes) if augment.mixup_alpha or augment.cutmix_alpha else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        if float(torch.rand(())) >= self.mix_prob:
            targets = torch.nn.functional.one_hot(labels, self.num_classes)
            return images, targets.to(images.dtype)
        pick = int(torch.multinomial(torch.tensor(self.p), 1)) if len(self.p) > 1 else 0
        return self.choices[pick](images, labels)


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
