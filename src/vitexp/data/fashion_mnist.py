"""Fashion-MNIST (Xiao et al. 2017): 70,000 real 28x28 grey photos of clothes in 10
classes, the official 60,000 / 10,000 split; real data that others have measured, so a
number here can stand beside published ones.

The four gzipped idx files are found in the first of: data.root; Debian's package
(`apt-get install dataset-fashion-mnist`: /usr/share/datasets/fashion-mnist);
$VITEXP_DATA/fashion-mnist; and each place's torchvision layout (FashionMNIST/raw/). With
data.download=true torchvision fetches them into data.root (or $VITEXP_DATA/fashion-mnist).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from vitexp.data.config import DataConfig
from vitexp.errors import DataError

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049  # idx: ubyte, 3 dims / 1 dim


def candidates(root: str | None) -> list[Path]:
    """Where the files may be, in the order they are looked for."""
    places = [Path(root).expanduser()] if root else []
    places.append(DEBIAN)
    if os.environ.get("VITEXP_DATA"):
        places.append(Path(os.environ["VITEXP_DATA"]) / "fashion-mnist")
    return [p for place in places for p in (place, place / "FashionMNIST" / "raw")]


def has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FILES.values() for name in pair[:2])


def find(cfg: DataConfig) -> Path:
    """The folder that holds all four files (fetched first with data.download=true)."""
    for folder in candidates(cfg.root):
        if has_files(folder):
            return folder
    if cfg.download:
        return download(cfg)
    looked = ", ".join(str(p) for p in candidates(cfg.root)[::2])
    raise DataError(
        f"data.source=fashion_mnist: its four idx files are in none of {looked}; get them "
        "with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or set "
        "data.download=true (torchvision fetches them, needs a network)"
    )


def download(cfg: DataConfig) -> Path:
    from torchvision.datasets import FashionMNIST

    root = Path(cfg.root or Path(os.environ.get("VITEXP_DATA", "data")) / "fashion-mnist")
    try:
        FashionMNIST(str(root), train=True, download=True)
    except Exception as err:  # no network, a proxy, a full disk: say which and where
        raise DataError(
            f"data.download=true: fetching Fashion-MNIST into {root} failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "install dataset-fashion-mnist with apt or copy its four .gz files there"
        ) from None
    return root / "FashionMNIST" / "raw"


def read_idx(path: Path, magic: int, count: int) -> np.ndarray:
    """The uint8 array of one gzipped idx file, its header checked against what it must be."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(
            f"data.source=fashion_mnist: {path} is not a readable gzip file ({err}); "
            "reinstall dataset-fashion-mnist or fetch it again"
        ) from None
    dims = raw[3] if len(raw) >= 4 else 0
    header = np.frombuffer(raw[: 4 + 4 * dims], dtype=">u4") if len(raw) >= 4 + 4 * dims else []
    shape = tuple(int(d) for d in header[1:])
    want = (count, 28, 28) if magic == _IMAGES_MAGIC else (count,)
    if len(header) == 0 or int(header[0]) != magic or shape != want:
        raise DataError(
            f"data.source=fashion_mnist: {path} is not the expected idx file (shape "
            f"{shape or 'unreadable'}, expected {want}); reinstall or fetch it again"
        )
    body = raw[4 + 4 * dims :]
    if len(body) != int(np.prod(want)):
        raise DataError(
            f"data.source=fashion_mnist: {path} is truncated ({len(body)} of "
            f"{int(np.prod(want))} bytes); reinstall or fetch it again"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(want)


def load(cfg: DataConfig) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], Path]:
    """{"train": (images (N, 28, 28) uint8, labels), "test": ...} and where they were."""
    folder = find(cfg)
    out = {}
    for split, (images, labels, count) in FILES.items():
        x = read_idx(folder / images, _IMAGES_MAGIC, count)
        y = read_idx(folder / labels, _LABELS_MAGIC, count)
        if y.max() >= len(CLASS_NAMES):
            raise DataError(
                f"data.source=fashion_mnist: {folder / labels} has label {int(y.max())}, "
                "beyond the 10 classes; reinstall or fetch it again"
            )
        out[split] = (x, y.astype(np.int64))
    return out, folder
