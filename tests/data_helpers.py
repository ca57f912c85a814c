"""Small local datasets written by the data tests (nothing is downloaded)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from vitexp.data.config import AugmentConfig, DataConfig

NO_AUG = AugmentConfig(random_resized_crop=False, hflip=False, crop_pct=1.0)


def data_cfg(**overrides) -> DataConfig:
    """A DataConfig for tests: no workers, small batches, no augmentation."""
    kwargs = dict(batch_size=4, num_workers=0, augment=NO_AUG)
    kwargs.update(overrides)
    return DataConfig(**kwargs)


def solid(value: int | tuple[int, int, int], size=(8, 8), mode="RGB") -> Image.Image:
    """An image of one colour; `value` is an int for grey or the id of a test image."""
    colour = value if isinstance(value, tuple) else (value, value, value)
    return Image.new(mode, size, colour if mode == "RGB" else value)


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_cifar(root: Path, n_train_per_batch: int = 10, n_test: int = 10, hundred=False):
    """Fake CIFAR batch files in the python-pickle layout; image i is filled with i % 256."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    n_classes = 100 if hundred else 10
    key = "fine_labels" if hundred else "labels"

    def batch(start: int, n: int) -> dict:
        ids = np.arange(start, start + n)
        data = np.repeat((ids % 256).astype(np.uint8)[:, None], 3 * 32 * 32, axis=1)  # (n, 3072)
        return {"data": data, key: [int(i % n_classes) for i in ids]}

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)

    names = [f"class{i}" for i in range(n_classes)]
    if hundred:
        dump("train", batch(0, 5 * n_train_per_batch))
        dump("test", batch(1000, n_test))
        dump("meta", {"fine_label_names": names, "coarse_label_names": names[:20]})
    else:
        for b in range(5):
            dump(f"data_batch_{b + 1}", batch(b * n_train_per_batch, n_train_per_batch))
        dump("test_batch", batch(1000, n_test))
        dump("batches.meta", {"label_names": names})
    return names


def write_folder(root: Path, classes: dict[str, int], start: int = 0, ext: str = ".png") -> int:
    """root/<class>/<k><ext>: `count` solid images per class, valued start, start+1, ..."""
    value = start
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            solid(value % 256).save(root / name / f"{k}{ext}")
            value += 1
    return value


def write_parquet(
    path: Path, ids: range, names=("a", "b", "c"), labels=None, images=None, row_group_size=None
) -> None:
    """A parquet file with a datasets Image column (image id i filled with i, or the encoded
    `images`) and a ClassLabel, or, given `labels`, a plain label column (int64 or string)
    holding them; one row group unless `row_group_size`."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as HFImage

    if labels is None:
        label = ClassLabel(names=list(names))
    else:
        label = Value("string" if isinstance(labels[0], str) else "int64")
    features = Features({"image": HFImage(), "label": label, "idx": Value("int64")})
    rows = {
        "image": [
            {"bytes": png_bytes(solid(i % 256, (4, 4))) if images is None else data, "path": None}
            for i, data in zip(ids, images or [None] * len(ids), strict=True)
        ],
        "label": [i % len(names) for i in ids] if labels is None else list(labels),
        "idx": list(ids),
    }
    Dataset.from_dict(rows, features=features).to_parquet(str(path), batch_size=row_group_size)


def pixel_ids(images) -> list[int]:
    """Recover the solid value of each image of a batch normalised with mean 0, std 1."""
    return [round(float(x[0, 0, 0]) * 255) for x in images]
