"""AugReg's augmentation: RandAugment per training image, MixUp / CutMix per training batch
with soft targets for both losses; the evaluation path untouched; all of it seeded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from test_train import train
from vitexp.config import LossConfig, OptimConfig, ScheduleConfig
from vitexp.data import build_transforms
from vitexp.data.config import AugmentConfig, RandAugmentConfig
from vitexp.data.transforms import BatchMix
from vitexp.errors import ConfigError
from vitexp.training.module import ViTModule

from conftest import tiny_vit

MEAN, STD = [0.5] * 3, [0.5] * 3


def image(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def pipelines(**augment):
    a = AugmentConfig(random_resized_crop=False, hflip=False, crop_pct=1.0, **augment)
    return (build_transforms(a, (32, 32), MEAN, STD, train) for train in (True, False))


@pytest.mark.parametrize("crop_pct", [0.5, 0.875, 1.0])
@pytest.mark.parametrize("source", [(48, 48), (40, 64), (64, 30)])  # (H, W) of the image
@pytest.mark.parametrize("img_size", [(32, 32), (24, 40)])
def test_without_the_random_crop_training_frames_an_image_as_evaluation(crop_pct, source, img_size):
    """With every random operation off, the training pipeline returns the tensor the
    evaluation pipeline returns (resize by crop_pct, center crop): a model is tested on the
    framing it was trained on (before, training resized the whole image to img_size and
    evaluation cropped: 11 points lost on Fashion-MNIST at crop_pct 0.875)."""
    a = AugmentConfig(random_resized_crop=False, hflip=False, crop_pct=crop_pct)
    train_tf, eval_tf = (build_transforms(a, img_size, MEAN, STD, t) for t in (True, False))
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (*source, 3), generator=g, dtype=torch.uint8)
    img = Image.fromarray(pixels.numpy())
    out = train_tf(img)
    assert out.shape == (3, *img_size) and not train_tf.is_random
    assert torch.equal(out, eval_tf(img))
    flipped = AugmentConfig(random_resized_crop=False, hflip=True, crop_pct=crop_pct)
    flip_tf = build_transforms(flipped, img_size, MEAN, STD, True)
    torch.manual_seed(0)
    outs = [flip_tf(img) for _ in range(8)]  # then the flip, on that framing
    assert all(torch.equal(o, out) or torch.equal(o, out.flip(-1)) for o in outs)
    assert any(not torch.equal(o, out) for o in outs)


def test_randaugment_changes_training_images_only_and_is_seeded():
    train_tf, eval_tf = pipelines(randaugment=RandAugmentConfig(num_ops=2, magnitude=20))
    plain_train, plain_eval = pipelines()
    img = image()
    assert train_tf.is_random and not plain_train.is_random
    torch.testing.assert_close(eval_tf(img), plain_eval(img))  # evaluation: untouched
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(torch.stack([train_tf(image(i)) for i in range(8)]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # the same seed, the same ops
    assert not torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[0], torch.stack([plain_train(image(i)) for i in range(8)]))


def batch(n: int = 8, classes: int = 4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % classes


@pytest.mark.parametrize("which", ["mixup", "cutmix"])
def test_batch_mix_gives_soft_targets_that_match_the_mixed_pixels(which):
    images, labels = batch()
    alpha = {"mixup_alpha": 1.0} if which == "mixup" else {"cutmix_alpha": 1.0}
    mix = BatchMix.from_config(AugmentConfig(**alpha), num_classes=4)
    torch.manual_seed(3)
    mixed, targets = mix(images, labels)
    assert targets.shape == (8, 4)
    torch.testing.assert_close(targets.sum(-1), torch.ones(8))
    # torchvision mixes each image with the previous one in the batch: weight lam on its own
    lam = float(targets[0, labels[0]])
    assert 0 < lam < 1
    partner = images.roll(1, 0)
    if which == "mixup":
        torch.testing.assert_close(mixed, lam * images + (1 - lam) * partner)
    else:  # a box of the partner's pixels, the box's area share = 1 - lam
        from_partner = (mixed == partner).all(1) & (mixed != images).all(1)
        share = from_partner[0].float().mean().item()
        assert share == pytest.approx(1 - lam, abs=1 / 16)


def test_batch_mix_probabilities_and_switch():
    images, labels = batch()
    off = BatchMix.from_config(AugmentConfig(mixup_alpha=1.0, mix_prob=0.0), num_classes=4)
    mixed, targets = off(images, labels)
    torch.testing.assert_close(mixed, images, rtol=0, atol=0)
    torch.testing.assert_close(targets, F.one_hot(labels, 4).float())
    assert BatchMix.from_config(AugmentConfig(), num_classes=4) is None
    cutmix_only = BatchMix.from_config(
        AugmentConfig(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0), num_classes=4
    )
    for seed in range(5):  # switch_prob 1: CutMix every time, so pixels are copied, not blended
        torch.manual_seed(seed)
        mixed, _ = cutmix_only(images, labels)
        copied = (mixed == images) | (mixed == images.roll(1, 0))
        assert bool(copied.all())


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_both_losses_take_soft_targets(loss):
    module = ViTModule(
        tiny_vit(num_classes=4), OptimConfig(), ScheduleConfig(), LossConfig(name=loss)
    )
    logits = torch.randn(8, 4)
    labels = torch.arange(8) % 4
    one_hot = F.one_hot(labels, 4).float()
    torch.testing.assert_close(module.loss_fn(logits, one_hot), module.loss_fn(logits, labels))
    soft = 0.7 * one_hot + 0.3 * one_hot.roll(1, 0)
    by_hand = (
        -(soft * logits.log_softmax(-1)).sum(-1).mean()
        if loss == "softmax"
        else F.binary_cross_entropy_with_logits(logits, soft, reduction="none").sum(-1).mean()
    )
    torch.testing.assert_close(module.loss_fn(logits, soft), by_hand)


def test_a_mixed_run_is_deterministic_given_its_seed(tmp_path):
    heavy = [
        "data.augment.randaugment.num_ops=2",
        "data.augment.randaugment.magnitude=15",
        "data.augment.mixup_alpha=0.8",
        "data.augment.cutmix_alpha=1.0",
        "loss.label_smoothing=0.1",
        "model.drop_path_rate=0.1",
        "fewshot.enabled=false",
    ]
    a = train(tmp_path / "a", *heavy)["metrics"]
    b = train(tmp_path / "b", *heavy)["metrics"]
    c = train(tmp_path / "c", *heavy, "seed=1")["metrics"]
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.augment.randaugment.magnitude=31", r"magnitude=31 must be in \[0, 30\]"),
        ("data.augment.randaugment.num_ops=-1", r"randaugment.num_ops=-1 must be >= 0"),
        ("data.augment.mixup_alpha=-0.2", r"data.augment.mixup_alpha=-0.2 must be >= 0"),
        ("data.augment.switch_prob=1.5", r"data.augment.switch_prob=1.5 must be in \[0, 1\]"),
        ("fewshot.data.augment.cutmix_alpha=-1", r"fewshot.data.augment.cutmix_alpha=-1.0"),
    ],
)
def test_bad_augmentation_settings_are_named(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(tmp_path / "bad", override)
