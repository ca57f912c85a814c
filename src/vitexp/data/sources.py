"""Where the images come from: one function per `data.source`, each returning `Splits`.

A map-style split yields `(PIL RGB image | None, int label)` and has `labels` (int64, known
without decoding anything); None is a corrupt image under `data.on_corrupt=skip`. Held-out
splits are seeded and stratified (`holdout`). Hugging Face datasets (in memory or streamed)
are in `hf.py`; images are decoded by `images.ImageDecoder` (odd modes, huge, corrupt).
Nothing is ever downloaded unless `data.download=true`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitexp.data import shapes as shapes_lib
from vitexp.data.config import DataConfig
from vitexp.data.images import IMAGE_SUFFIXES, ImageDecoder
from vitexp.errors import DataError

TORCHVISION = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}
HF_BUILDERS = ("parquet", "arrow", "csv", "json", "imagefolder", "webdataset", "text", "pandas")


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    origin: str  # names the data in messages, e.g. "data.root=/x"


# --- map-style splits --------------------------------------------------------------------
class ArraySplit(Dataset):
    """Images held in memory as uint8 (N, H, W, 3), or grey (N, H, W) given as RGB."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image = Image.fromarray(self.images[i])
        return image if image.mode == "RGB" else image.convert("RGB"), int(self.labels[i])


class FileSplit(Dataset):
    """Image files decoded on access."""

    def __init__(self, paths: list[str], labels: np.ndarray, decoder: ImageDecoder) -> None:
        self.paths, self.labels, self.decoder = paths, np.asarray(labels, np.int64), decoder

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        return self.decoder(self.paths[i], self.paths[i]), int(self.labels[i])


class SubsetSplit(Dataset):
    """Some indices of a split (held-out fractions)."""

    def __init__(self, base: Dataset, indices: np.ndarray) -> None:
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.labels = base.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        return self.base[int(self.indices[i])]


class RelabelledSplit(Dataset):
    """The images of some classes of a split, their labels renumbered 0.. (data.classes)."""

    def __init__(self, base: Dataset, mapping: dict[int, int]) -> None:
        self.base, self.mapping = base, mapping
        self.indices = np.flatnonzero(np.isin(base.labels, list(mapping)))
        self.labels = np.array([mapping[int(y)] for y in base.labels[self.indices]], np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        return self.base[int(self.indices[i])][0], int(self.labels[i])


def keep_classes(splits: Splits, classes: list) -> Splits:
    """Splits of only `classes` (names, or indices into the source's class list), labelled
    in the order given; a name or index the data lacks is named with the ones it has."""
    names = list(splits.class_names)
    picked = []
    for c in classes:
        if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(names):
            picked.append(c)
        elif str(c) in names:
            picked.append(names.index(str(c)))
        else:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise DataError(
                f"data.classes: {c!r} is not a class of {splits.origin} (its classes: "
                f"{shown}; or indices 0-{len(names) - 1})"
            )
    if len(set(picked)) != len(picked):
        raise DataError(f"data.classes={list(classes)} names a class twice")
    mapping = {old: new for new, old in enumerate(picked)}
    train, val, test = (
        RelabelledSplit(getattr(splits, s), mapping) for s in ("train", "val", "test")
    )
    return Splits(train, val, test, [names[i] for i in picked], splits.origin)


def holdout(labels: np.ndarray, fraction: float, seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) sorted index arrays. `held` has round(fraction * N) examples (>= 1 when
    fraction > 0 and N > 1), each class in proportion (largest remainders, seeded ties)."""
    n = len(labels)
    target = min(max(1, round(fraction * n)), n - 1) if fraction > 0 and n > 1 else 0
    if target == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    extra = target - int(take.sum())
    take[np.lexsort((rng.random(len(classes)), take - quota))[:extra]] += 1
    order = rng.permutation(n)
    order = order[np.argsort(inverse[order], kind="stable")]  # grouped by class, shuffled
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_class = np.arange(n) - starts[inverse[order]]
    held_mask = rank_in_class < take[inverse[order]]
    return np.sort(order[~held_mask]), np.sort(order[held_mask])


def subset_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Every index of a split in the order that `data.subset` takes them: subset n is the
    first n (`balanced_subset`), so a smaller subset is part of every larger one.

    Each class's images are put in a seeded random order once; round k holds the k-th image
    of every class that has more than k (the classes in a seeded random order per round).
    Any prefix is therefore class-balanced, equal rather than proportional: every class
    gets the same number of images as far as its size allows (min(size, L) or L + 1), and a
    class with fewer images than its share gives the rest to the larger classes."""
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng([seed % 2**64, 3])
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = rng.permutation(n)
    order = order[np.argsort(inverse[order], kind="stable")]  # grouped by class, shuffled
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[inverse[order]]  # position within its class
    return np.lexsort((rng.random(n), rank))  # round by round, classes shuffled per round


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The sorted indices of `data.subset`: the first `size` of `subset_order`."""
    return np.sort(subset_order(labels, seed)[:size])


def _fractions(
    base: Dataset, cfg: DataConfig, test: Dataset | None = None, val: Dataset | None = None
) -> tuple[Dataset, Dataset, Dataset]:
    """Hold out test (test_fraction of all) and val (val_fraction of the rest) where the
    source lacks them."""
    train: Dataset = base
    if test is None:
        keep, held = holdout(base.labels, cfg.test_fraction, [cfg.seed % 2**64, 1])
        train, test = SubsetSplit(base, keep), SubsetSplit(base, held)
    if val is None:
        keep, held = holdout(train.labels, cfg.val_fraction, [cfg.seed % 2**64, 2])
        train, val = SubsetSplit(train, keep), SubsetSplit(train, held)
    return train, val, test


# --- sources -----------------------------------------------------------------------------
def load_digits(cfg: DataConfig) -> Splits:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16) as RGB uint8."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    images = np.repeat(grey[..., None], 3, axis=-1)  # (N, 8, 8, 3)
    train, val, test = _fractions(ArraySplit(images, d.target), cfg)
    return Splits(train, val, test, [str(c) for c in range(10)], "data.source=digits")


def load_fashion_mnist(cfg: DataConfig) -> Splits:
    """Fashion-MNIST's official train / test split (vitexp.data.fashion_mnist); val is a
    seeded, stratified val_fraction of train."""
    from vitexp.data import fashion_mnist

    arrays, folder = fashion_mnist.load(cfg)
    base, test = (ArraySplit(*arrays[split]) for split in ("train", "test"))
    train, val, test = _fractions(base, cfg, test=test)
    return Splits(train, val, test, list(fashion_mnist.CLASS_NAMES), f"data.root={folder}")


def load_shapes(cfg: DataConfig, img_size: tuple[int, int]) -> Splits:
    """The procedural position-dependent dataset of vitexp.data.shapes (data.num_classes of
    its classes; all of them when null)."""
    num_classes = shapes_lib.MAX_CLASSES if cfg.num_classes is None else cfg.num_classes
    if num_classes > shapes_lib.MAX_CLASSES:
        raise DataError(
            f"data.num_classes={cfg.num_classes} but shapes has at most "
            f"{shapes_lib.MAX_CLASSES} classes (16 shape types x 4 quadrants); "
            f"set data.num_classes <= {shapes_lib.MAX_CLASSES}"
        )
    a = cfg.augment
    if a.hflip or a.random_resized_crop:
        raise DataError(
            "data.source=shapes labels depend on where the shape is, which flips and random "
            "crops change; set data.augment.hflip=false and data.augment.random_resized_crop=false"
        )
    sizes = {"train": cfg.shapes.num_train, "val": cfg.shapes.num_val, "test": cfg.shapes.num_test}
    made = [
        shapes_lib.ShapesDataset(n, num_classes, img_size, cfg.seed, split, cfg.shapes.cache_dir)
        for split, n in sizes.items()
    ]
    return Splits(*made, shapes_lib.class_names(num_classes), "data.source=shapes")


def load_torchvision(cfg: DataConfig) -> Splits:
    """CIFAR10/100 from data.root; val is a seeded val_fraction of the official train set."""
    from torchvision import datasets as tvd

    if cfg.dataset not in TORCHVISION:
        raise DataError(
            f"data.dataset={cfg.dataset!r} is not a torchvision dataset vitexp reads; choose one "
            f"of {', '.join(TORCHVISION)} (or data.source=imagefolder / hf)"
        )
    root = _root(cfg, must_exist=not cfg.download)
    folder = TORCHVISION[cfg.dataset]
    if not cfg.download and not (root / folder).is_dir():
        raise DataError(
            f"data.root={root} does not contain {cfg.dataset} ({folder}/); "
            "put it there or set data.download=true"
        )
    cls = getattr(tvd, cfg.dataset)
    try:
        official = [cls(str(root), train=t, download=cfg.download) for t in (True, False)]
    except RuntimeError as err:
        raise DataError(
            f"data.root={root}: {cfg.dataset} in {folder}/ is incomplete or corrupt "
            f"({str(err).splitlines()[0]}); replace it or set data.download=true"
        ) from None
    base, test = (ArraySplit(np.asarray(d.data), np.asarray(d.targets)) for d in official)
    train, val, test = _fractions(base, cfg, test=test)
    return Splits(train, val, test, list(official[0].classes), f"data.root={root}")


def load_imagefolder(cfg: DataConfig, decoder: ImageDecoder) -> Splits:
    """root/<class>/<image>, or root/{train,val,test}/<class>/<image> (see the module doc of
    vitexp.data.datamodule for which folder becomes which split)."""
    root = _root(cfg, must_exist=True)
    if not (root / "train").is_dir():
        classes = _class_dirs(root)
        train, val, test = _fractions(_scan(root, classes, decoder, required=True), cfg)
        return Splits(train, val, test, classes, f"data.root={root}")
    classes = _class_dirs(root / "train")
    train = _scan(root / "train", classes, decoder, required=True)
    has_val, has_test = (root / "val").is_dir(), (root / "test").is_dir()
    if has_test:
        test = _scan(root / "test", classes, decoder)
        val = _scan(root / "val", classes, decoder) if has_val else None
    elif has_val:  # the ImageNet convention: the official val set is the reported test set
        test, val = _scan(root / "val", classes, decoder), None
    else:
        test = val = None
    train, val, test = _fractions(train, cfg, test=test, val=val)
    return Splits(train, val, test, classes, f"data.root={root}")


def _root(cfg: DataConfig, must_exist: bool) -> Path:
    if not cfg.root:
        raise DataError(
            f"data.root is not set; data.source={cfg.source} needs the folder that holds the data"
        )
    root = Path(cfg.root).expanduser()
    if must_exist and not root.is_dir():
        hint = " or set data.download=true" if cfg.source == "torchvision" else ""
        raise DataError(f"data.root={root} does not exist; point it at the data{hint}")
    return root


def _class_dirs(folder: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name[0] != ".")
    if not classes:
        raise DataError(
            f"data.root={folder} has no class folders; expected {folder}/<class>/<image>"
        )
    return classes


def _scan(folder: Path, classes: list[str], decoder: ImageDecoder, required: bool = False):
    """Every image under folder/<class>/ (recursively, sorted), as a FileSplit."""
    unknown = sorted(set(_class_dirs(folder)) - set(classes))
    if unknown:
        raise DataError(
            f"data.root: {folder} has class folders that train/ lacks ({', '.join(unknown)}); "
            "make the class folders of all splits match"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = []
        for d, subdirs, files in os.walk(folder / name, followlinks=True):
            subdirs.sort()  # a fixed walk order: the file list (and so the splits) is stable
            found += [
                os.path.join(d, f)
                for f in sorted(files)
                if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")
            ]
        if required and not found:
            exts = "/".join(e[1:] for e in IMAGE_SUFFIXES)
            raise DataError(
                f"data.root: {folder / name} has no images ({exts}); "
                "add images or remove the folder"
            )
        paths += found
        labels += [label] * len(found)
    return FileSplit(paths, np.array(labels, dtype=np.int64), decoder)
