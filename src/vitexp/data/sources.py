"""Where the images come from: one function per `data.source`, each returning `Splits`.

A map-style split yields `(PIL RGB image | None, int label)` and has `labels` (int64, known
without decoding anything); None is a corrupt image under `data.on_corrupt=skip`. Held-out
splits are seeded and stratified (`holdout`). A streaming HF train split is a `StreamSplit`
(see there). Images are decoded by `ImageDecoder` (odd modes, huge and corrupt files).
Nothing is ever downloaded unless `data.download=true`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import itertools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vitexp.config import DataConfig
from vitexp.data import shapes as shapes_lib
from vitexp.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TORCHVISION = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}
HF_BUILDERS = ("parquet", "arrow", "csv", "json", "imagefolder", "webdataset", "text", "pandas")
_SKIPPED: set[str] = set()  # corrupt files already reported by this process


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    origin: str  # names the data in messages, e.g. "data.root=/x"


# --- decoding ----------------------------------------------------------------------------
class ImageDecoder:
    """Bytes, a path, an HF `{"bytes", "path"}` dict or a PIL image -> PIL RGB, or None for
    a corrupt image under on_corrupt=skip (warned once per file, with a running count).

    Large JPEGs are decoded at a reduced scale (`Image.draft`) whose shorter side stays
    >= min_size; images above PIL's decompression-bomb limit count as corrupt.
    """

    def __init__(self, on_corrupt: str = "error", min_size: int = 0) -> None:
        self.on_corrupt = on_corrupt
        self.min_size = min_size

    def __call__(self, src: Any, name: str) -> Image.Image | None:
        try:
            return self._decode(src)
        except DataError:
            raise
        except UnidentifiedImageError:
            return self._corrupt(name, "not an image file PIL can read")
        except Image.DecompressionBombError:
            return self._corrupt(name, _bomb_message())
        except Exception as err:  # truncated data, bad headers...: each plugin fails its own way
            return self._corrupt(name, f"{type(err).__name__}: {str(err).splitlines()[0]}")

    def _decode(self, src: Any) -> Image.Image:
        if isinstance(src, Image.Image):
            return to_rgb(src)
        if isinstance(src, dict):
            src = src["bytes"] if src.get("bytes") is not None else src.get("path")
        if isinstance(src, (str, os.PathLike)):
            src = Path(src).read_bytes()  # no open file handle outlives the call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(src))
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:
            raise Image.DecompressionBombError(_bomb_message())
        if img.format == "JPEG" and self.min_size:
            img.draft("RGB", (self.min_size, self.min_size))  # DCT scaling: 1/2, 1/4, 1/8
        img.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
        return to_rgb(img)

    def _corrupt(self, name: str, reason: str) -> None:
        if self.on_corrupt == "error":
            raise DataError(
                f"{name}: unreadable image ({reason}); repair or remove it, "
                "or set data.on_corrupt=skip"
            )
        if name not in _SKIPPED:
            _SKIPPED.add(name)
            warnings.warn(
                f"skipping unreadable image {name} ({reason}); {len(_SKIPPED)} skipped so far "
                "(data.on_corrupt=skip)",
                stacklevel=3,
            )
        return None


def _bomb_message() -> str:
    return (
        f"more than PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS)"
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency (RGBA, LA, PA, P with a transparent colour) is
    composited on white, as a viewer shows it. 16-bit greyscale (I;16*, and I when in
    0..65535) is divided by 257; float F is read as 0..1 or 0..255; other ranges of I / F
    are min-max scaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        low, high = a.min(), a.max()
        if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
            a = a / 257.0  # 65535 -> 255: a rescale, not a clip
        elif mode == "F" and low >= 0 and high <= 1:
            a = a * 255.0
        elif not (mode == "F" and low >= 0 and high <= 255) and high > low:
            a = (a - low) * (255.0 / (high - low))
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


# --- map-style splits --------------------------------------------------------------------
class ArraySplit(Dataset):
    """Images held in memory as uint8 (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]), int(self.labels[i])


class FileSplit(Dataset):
    """Image files decoded on access."""

    def __init__(self, paths: list[str], labels: np.ndarray, decoder: ImageDecoder) -> None:
        self.paths, self.labels, self.decoder = paths, np.asarray(labels, np.int64), decoder

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        return self.decoder(self.paths[i], self.paths[i]), int(self.labels[i])


class HFSplit(Dataset):
    """Rows of a (map-style) Hugging Face dataset; the image column is decoded here."""

    def __init__(self, ds: Any, column: str, labels: np.ndarray, decoder: ImageDecoder, name: str):
        self.ds, self.column, self.decoder, self.name = ds, column, decoder, name
        self.labels = np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        value = self.ds[int(i)][self.column]
        return self.decoder(value, _row_name(value, f"{self.name}[{int(i)}]")), int(self.labels[i])


class RowsSplit(Dataset):
    """Raw rows (image value, label) held in memory: the head of a stream used for eval."""

    def __init__(self, rows: list[tuple[Any, int]], decoder: ImageDecoder, name: str) -> None:
        self.rows, self.decoder, self.name = rows, decoder, name
        self.labels = np.array([label for _, label in rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        value, label = self.rows[i]
        return self.decoder(value, _row_name(value, f"{self.name}[{i}]")), label


class SubsetSplit(Dataset):
    """Some indices of a split (held-out fractions)."""

    def __init__(self, base: Dataset, indices: np.ndarray) -> None:
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.labels = base.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        return self.base[int(self.indices[i])]


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


def load_shapes(cfg: DataConfig, img_size: tuple[int, int]) -> Splits:
    """The procedural position-dependent dataset of vitexp.data.shapes."""
    if cfg.num_classes > shapes_lib.MAX_CLASSES:
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
        shapes_lib.ShapesDataset(n, cfg.num_classes, img_size, cfg.seed, split)
        for split, n in sizes.items()
    ]
    return Splits(*made, shapes_lib.class_names(cfg.num_classes), "data.source=shapes")


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
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")
            ]
        if required and not found:
            exts = "/".join(e[1:] for e in IMG_EXTENSIONS)
            raise DataError(
                f"data.root: {folder / name} has no images ({exts}); "
                "add images or remove the folder"
            )
        paths += found
        labels += [label] * len(found)
    return FileSplit(paths, np.array(labels, dtype=np.int64), decoder)


# --- Hugging Face datasets ---------------------------------------------------------------
def load_hf(cfg: DataConfig, decoder: ImageDecoder) -> Splits:
    """A hub dataset or a builder over local files (data.data_files, data.root)."""
    from datasets import ClassLabel
    from datasets import Image as HFImage

    name = cfg.dataset or _builder_for(cfg.data_files)
    origin = f"data.dataset={name}"
    dd = _hf_load(cfg, name)
    for key in ("train_split", "val_split", "test_split"):
        split = getattr(cfg, key)
        if split is not None and split not in dd:
            raise DataError(
                f"data.{key}={split!r} is not a split of {origin} (it has {', '.join(dd)}); "
                f"set data.{key} to one of them" + ("" if key == "train_split" else " or null")
            )
    first = dd[cfg.train_split]
    features = first.features or {}
    for key in ("image_column", "label_column"):
        col = getattr(cfg, key)
        if features and col not in features:
            raise DataError(
                f"data.{key}={col!r} is not a column of {origin} (columns: "
                f"{', '.join(features)}); set data.{key}"
            )
    label_feature = features.get(cfg.label_column)
    names = label_feature.names if isinstance(label_feature, ClassLabel) else None

    def prepare(ds):
        # undecoded {"bytes", "path"}: ImageDecoder handles odd modes and corrupt files
        if isinstance(ds.features.get(cfg.image_column) if ds.features else None, HFImage):
            ds = ds.cast_column(cfg.image_column, HFImage(decode=False))
        return ds.select_columns([cfg.image_column, cfg.label_column])

    if cfg.streaming:
        return _hf_streaming(cfg, dd, prepare, names, decoder, origin)
    if names is None:  # ints keep their ids (names "0".."max"); strings are sorted
        values = set(first.with_format("arrow")[cfg.label_column].to_pylist())
        ints = all(isinstance(v, int) for v in values)
        names = [str(i) for i in range(max(values) + 1)] if ints else sorted(map(str, values))
    index = {n: i for i, n in enumerate(names)}

    def split_of(split: str | None) -> HFSplit | None:
        if split is None:
            return None
        ds = prepare(dd[split])
        values = ds.with_format("arrow")[cfg.label_column].to_pylist()
        if not isinstance(label_feature, ClassLabel):
            try:
                values = [index[str(v)] for v in values]
            except KeyError as err:
                raise DataError(
                    f"{origin}: split {split} has label {err.args[0]!r}, which "
                    f"data.train_split={cfg.train_split} lacks"
                ) from None
        return HFSplit(ds, cfg.image_column, np.array(values), decoder, f"{name}[{split}]")

    train, val, test = _fractions(
        split_of(cfg.train_split), cfg, test=split_of(cfg.test_split), val=split_of(cfg.val_split)
    )
    return Splits(train, val, test, list(names), origin)


def _hf_load(cfg: DataConfig, name: str) -> Any:
    from datasets import load_dataset

    local_builder = name in HF_BUILDERS or Path(name).expanduser().is_dir()
    kwargs: dict[str, Any] = {"streaming": cfg.streaming}
    if cfg.data_files:
        kwargs["data_files"] = _plain(cfg.data_files)
    if cfg.root:
        kwargs["data_dir" if local_builder else "cache_dir"] = str(Path(cfg.root).expanduser())
    try:
        with _offline(not cfg.download):
            dd = load_dataset(name, **kwargs)
    except Exception as err:  # datasets raises many types (FileNotFound, Connection, Value...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"data.dataset={name} could not be loaded ({type(err).__name__}: {first}); check "
            "data.dataset, data.data_files and data.root, and that hub data is cached "
            "(or set data.download=true)"
        ) from None
    if not hasattr(dd, "keys"):
        raise DataError(
            f"data.dataset={name} loaded a single split; give data.data_files per split"
        )
    return dd


@contextlib.contextmanager
def _offline(enabled: bool):
    """Hub access off while loading, unless data.download=true."""
    if not enabled:
        yield
        return
    import datasets.config as dconfig
    import huggingface_hub.constants as hconst

    saved = dconfig.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE
    dconfig.HF_HUB_OFFLINE = hconst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dconfig.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE = saved


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _builder_for(data_files: Any) -> str:
    """The packaged builder for data files given without data.dataset (by extension)."""
    files = _plain(data_files)
    while isinstance(files, (dict, list, tuple)):
        files = next(iter(files.values() if isinstance(files, dict) else files))
    ext = Path(str(files)).suffix.lower()
    builders = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}
    builders |= {".jsonl": "json", ".tar": "webdataset"}
    return builders.get(ext, "imagefolder")


def _row_name(value: Any, fallback: str) -> str:
    path = (
        value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    )
    return path or fallback


def _row_key(value: Any) -> bytes:
    """Identity of a stream row (its path, else a hash of its bytes), to keep held-out rows
    out of train whatever the sharding."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return hashlib.blake2b(value["bytes"], digest_size=16).digest()
    return str(_row_name(value, repr(value))).encode()


def _hf_streaming(cfg, dd, prepare, names, decoder, origin) -> Splits:
    """Streaming: train is a StreamSplit; val/test without their own split are the first
    val_size (then the next val_size) rows of train, held in memory, and train drops them."""
    if names is None:
        raise DataError(
            f"{origin}: streaming needs a ClassLabel label column (data.label_column="
            f"{cfg.label_column}); cast it to ClassLabel or set data.streaming=false"
        )
    train = prepare(dd[cfg.train_split])
    held: dict[str, Dataset] = {}
    head = iter(train)
    exclude: set[bytes] = set()
    for key in ("val_split", "test_split"):
        split = getattr(cfg, key)
        if split is not None:
            held[key] = StreamSplit(prepare(dd[split]), cfg, decoder, f"{origin}[{split}]")
            continue
        rows = [
            (r[cfg.image_column], int(r[cfg.label_column]))
            for r in itertools.islice(head, cfg.val_size)
        ]
        exclude |= {_row_key(v) for v, _ in rows}
        held[key] = RowsSplit(rows, decoder, f"{origin}[{cfg.train_split} head]")
    stream = StreamSplit(train, cfg, decoder, f"{origin}[{cfg.train_split}]", exclude)
    return Splits(stream, held["val_split"], held["test_split"], list(names), origin)


class StreamSplit(IterableDataset):
    """An HF streaming split yielding (PIL | None, label, sample_seed).

    `configure(rank, world_size, shuffle_seed)` returns the copy for one rank: shuffled with
    data.shuffle_buffer and the seed (HF re-seeds it with `set_epoch`) when training,
    sharded with `split_dataset_by_node`; HF then gives each dataloader worker its own
    shards. `start_at(epoch, batches, batch_size)` makes the epoch skip, without decoding,
    the rows of batches that a killed run consumed (the loader reads workers in turn). The
    augmentation seed of a row is a function of (seed, epoch, rank, worker, position).
    With num_workers <= 1 a resumed epoch is exactly the killed one's rest; with more, it
    is the same batches, but the loader restarts its worker rotation at worker 0, so they
    come in a slightly different order.
    """

    def __init__(
        self,
        ds: Any,
        cfg: DataConfig,
        decoder: ImageDecoder,
        name: str,
        exclude: set[bytes] | None = None,
    ) -> None:
        self.ds, self.decoder, self.name, self.exclude = ds, decoder, name, exclude or set()
        self.image_column, self.label_column = cfg.image_column, cfg.label_column
        self.buffer = cfg.shuffle_buffer
        self.rank, self.seed, self.epoch = 0, 0, 0
        self._start: tuple[int, int, int] | None = None  # (epoch, batches, batch_size)

    def configure(self, rank: int, world_size: int, shuffle_seed: int | None) -> StreamSplit:
        from datasets.distributed import split_dataset_by_node

        ds = self.ds
        if shuffle_seed is not None:
            ds = ds.shuffle(seed=shuffle_seed, buffer_size=self.buffer)
        out = copy.copy(self)
        out.ds = (
            split_dataset_by_node(ds, rank=rank, world_size=world_size) if world_size > 1 else ds
        )
        out.rank, out.seed = rank, shuffle_seed or 0
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, epoch: int, batches: int, batch_size: int) -> None:
        self._start = (epoch, batches, batch_size)

    def __iter__(self):
        worker = get_worker_info()
        wid, nw = (worker.id, worker.num_workers) if worker else (0, 1)
        skip = 0
        if self._start and self._start[0] == self.epoch:
            _, batches, batch_size = self._start
            skip = len(range(wid, batches, nw)) * batch_size  # this worker's share, in order
        self.ds.set_epoch(self.epoch)
        base = int.from_bytes(
            hashlib.blake2b(
                repr((self.seed, self.epoch, self.rank, wid)).encode(), digest_size=7
            ).digest()
        )
        return self._rows(skip, base)

    def _rows(self, skip: int, base: int):
        rows = (
            r
            for r in self.ds
            if not self.exclude or _row_key(r[self.image_column]) not in self.exclude
        )
        for k, row in enumerate(itertools.islice(rows, skip, None), start=skip):
            value = row[self.image_column]
            img = self.decoder(value, _row_name(value, f"{self.name}[{k}]"))
            yield img, int(row[self.label_column]), (base + k * 0x9E3779B1) % (1 << 62)
