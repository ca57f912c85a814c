"""The data's configs (the `data` group and `data/augment`) and their checks.

`vitexp.config` composes `DataConfig` into the run's schema (`data`, `fewshot.data`) and
calls `validate_data`; the data module checks `data.subset` itself too (`check_subset`),
for a config that `validate` never saw. Each check raises `ConfigError` with one line naming
the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitexp.errors import ConfigError, check_fraction, check_one_of, check_positive

SOURCES = ("digits", "fashion_mnist", "shapes", "torchvision", "imagefolder", "hf", "litdata")
ON_CORRUPT = ("skip", "error")
DECODES = ("cpu", "gpu")


@dataclass
class RandAugmentConfig:
    """torchvision's RandAugment on each training image (AugReg's `randaug(N, M)`).

    num_ops: ops per image (0: off). magnitude: on torchvision's scale, 0 ..
    num_magnitude_bins - 1, the last bin each op's full range (the RandAugment paper's
    magnitude 10); AugReg's M (TF scale, 10 = full range) is M x 3 here, capped at 30.
    """

    num_ops: int = 0
    magnitude: int = 9
    num_magnitude_bins: int = 31


@dataclass
class AugmentConfig:
    """Training augmentation and eval resizing. Per image: the paper's Inception crop +
    flip, then RandAugment; per batch (on the device): MixUp or CutMix with soft targets
    (vitexp.data.transforms.BatchMix). The evaluation path only resizes and crops."""

    random_resized_crop: bool = True
    scale_min: float = 0.08  # lower bound of the crop's area fraction
    hflip: bool = True
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, center-crop img_size
    randaugment: RandAugmentConfig = field(default_factory=RandAugmentConfig)
    mixup_alpha: float = 0.0  # MixUp's Beta(alpha, alpha); 0: off
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha); 0: off
    mix_prob: float = 1.0  # probability that a batch is mixed at all (with either on)
    switch_prob: float = 0.5  # with both on: probability of CutMix instead of MixUp


@dataclass
class ShapesConfig:
    """Procedural dataset sizes (see vitexp.data.shapes)."""

    num_train: int = 20_000
    num_val: int = 1_000
    num_test: int = 2_000
    cache_dir: str | None = None  # render each split once into a .npy file here (reused)


@dataclass
class DataConfig:
    name: str = "digits"  # label used in results, reports and log keys
    source: str = (
        "digits"  # digits | fashion_mnist | shapes | torchvision | imagefolder | hf | litdata
    )
    dataset: str | None = None  # torchvision: CIFAR10 | CIFAR100; hf: hub name or builder
    root: str | None = None  # where the data lives on disk
    # hf: local files per split, e.g. {train: a.parquet}
    data_files: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None  # null: from the data; else checked against it
    # keep only these classes (names or indices of the source's), relabelled 0.. in this
    # order: e.g. pretrain on 6 Fashion-MNIST classes, transfer to the other 4
    classes: list[Any] | None = None
    batch_size: int = 64  # per device
    global_batch_size: int | None = None  # kept across device counts by accumulation
    num_workers: int = 2
    download: bool = False  # never fetch data unless asked
    seed: int = 0  # seed of the held-out splits
    val_fraction: float = 0.1  # of train, when the source has no validation split
    test_fraction: float = 0.2  # of all data, when the source has no test split
    image_column: str = "image"  # hf
    label_column: str = "label"  # hf
    streaming: bool = False  # hf: stream shards instead of downloading/reading them whole
    train_split: str = "train"  # hf split names
    val_split: str | None = None
    test_split: str | None = "test"
    val_size: int = 1000  # hf streaming: examples taken from the head of train for validation
    shuffle_buffer: int = 10_000  # hf streaming: rows each loader worker shuffles among
    on_corrupt: str = "error"  # skip | error: what an unreadable image does
    # cpu: loader workers decode and augment; gpu: workers send JPEG bytes and the device
    # decodes (nvjpeg), crops, flips, augments and normalises (vitexp.data.gpu_decode)
    decode: str = "cpu"
    # a fixed subset of the training split (after the val/test holdout): null = all of it,
    # an int = that many images, a float in (0, 1] = that fraction; class-balanced and nested
    # (a smaller subset is part of a larger one with the same subset_seed); a stream: its
    # first N rows (vitexp.data.datamodule)
    subset: Any = None
    subset_seed: int = 0  # which images the subset holds; independent of the training seed
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


def validate_data(d: DataConfig, key: str = "data") -> None:
    check_one_of(f"{key}.source", d.source, SOURCES)
    check_one_of(f"{key}.on_corrupt", d.on_corrupt, ON_CORRUPT)
    check_one_of(f"{key}.decode", d.decode, DECODES)
    if d.num_classes is not None and d.num_classes < 2:
        raise ConfigError(f"{key}.num_classes={d.num_classes} must be >= 2")
    check_positive(f"{key}.batch_size", d.batch_size)
    check_positive(f"{key}.global_batch_size", d.global_batch_size)
    check_positive(f"{key}.num_workers", d.num_workers, allow_zero=True)
    check_fraction(f"{key}.val_fraction", d.val_fraction)
    check_fraction(f"{key}.test_fraction", d.test_fraction)
    check_positive(f"{key}.val_size", d.val_size)
    check_positive(f"{key}.shuffle_buffer", d.shuffle_buffer)
    for split in ("num_train", "num_val", "num_test"):
        check_positive(f"{key}.shapes.{split}", getattr(d.shapes, split))
    if d.global_batch_size and d.global_batch_size % d.batch_size:
        raise ConfigError(
            f"{key}.global_batch_size={d.global_batch_size} is not a multiple of "
            f"{key}.batch_size={d.batch_size}"
        )
    if d.source in ("torchvision", "hf") and not d.dataset:
        raise ConfigError(
            f"{key}.dataset is not set; {key}.source={d.source} needs it "
            "(torchvision: CIFAR10 or CIFAR100; hf: a hub name or a builder such as parquet)"
        )
    if d.source == "litdata" and d.subset is not None:
        raise ConfigError(
            f"{key}.subset={d.subset!r} is not supported with {key}.source=litdata; pack the "
            "subset you want (python -m vitexp.pack) or use data=imagefolder / data=hf"
        )
    if d.source in ("torchvision", "imagefolder", "litdata") and not d.root:
        raise ConfigError(
            f"{key}.root is not set; {key}.source={d.source} reads the images from there "
            f"({key}.root=/path/to/data)"
        )
    check_subset(d, key, ConfigError)
    if d.classes is not None:
        kept = list(d.classes)
        if len(kept) < 2 or len(set(map(str, kept))) != len(kept):
            raise ConfigError(
                f"{key}.classes={kept} must name at least 2 different classes (names or indices)"
            )
        if d.source == "litdata" or d.streaming:
            raise ConfigError(
                f"{key}.classes is not supported for a stream or a pack; pack or stream only "
                "the classes you want"
            )
    a = d.augment
    if not 0 < a.scale_min <= 1:
        raise ConfigError(f"{key}.augment.scale_min={a.scale_min} must be in (0, 1]")
    if not 0 < a.crop_pct <= 1:
        raise ConfigError(f"{key}.augment.crop_pct={a.crop_pct} must be in (0, 1]")
    validate_augment(a, f"{key}.augment")


def validate_augment(a: AugmentConfig, key: str) -> None:
    r = a.randaugment
    check_positive(f"{key}.randaugment.num_ops", r.num_ops, allow_zero=True)
    check_positive(f"{key}.randaugment.num_magnitude_bins", r.num_magnitude_bins)
    if not 0 <= r.magnitude < r.num_magnitude_bins:
        raise ConfigError(
            f"{key}.randaugment.magnitude={r.magnitude} must be in [0, "
            f"{r.num_magnitude_bins - 1}] ({key}.randaugment.num_magnitude_bins - 1 is each "
            "op's full range)"
        )
    check_positive(f"{key}.mixup_alpha", a.mixup_alpha, allow_zero=True)
    check_positive(f"{key}.cutmix_alpha", a.cutmix_alpha, allow_zero=True)
    for name in ("mix_prob", "switch_prob"):
        if not 0 <= getattr(a, name) <= 1:
            raise ConfigError(f"{key}.{name}={getattr(a, name)!r} must be in [0, 1]")


def check_subset(d: DataConfig, key: str = "data", error: type = ConfigError) -> None:
    """data.subset: null, an int >= 1 (images) or a float in (0, 1] (a fraction of the
    training split; not for a stream, whose length is unknown); data.subset_seed an int >= 0.
    Raises `error` with one line naming the key."""
    value, seed = d.subset, d.subset_seed
    if type(seed) is not int or seed < 0:
        raise error(f"{key}.subset_seed={seed!r} must be an int >= 0")
    if value is None:
        return
    if type(value) is int and value >= 1:
        return
    if type(value) is float and 0 < value <= 1:
        if d.source == "hf" and d.streaming:
            raise error(
                f"{key}.subset={value!r} is a fraction, but {key}.streaming=true reads a stream "
                f"of unknown length; give a number of images, e.g. {key}.subset=10000"
            )
        return
    raise error(
        f"{key}.subset={value!r} must be null (all training images), an int >= 1 (a number "
        "of images) or a float in (0, 1] (a fraction of the training split)"
    )
