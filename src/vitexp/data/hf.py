"""Hugging Face `datasets` as a source: hub names or builders over local files, in memory
or streamed (the route for ImageNet-21k and JFT-scale parquet shards)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vitexp.config import DataConfig
from vitexp.data.images import ImageDecoder
from vitexp.data.sources import HF_BUILDERS, Splits, _fractions
from vitexp.errors import DataError


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


# --- Hugging Face datasets ---------------------------------------------------------------
def load_hf(cfg: DataConfig, decoder: ImageDecoder) -> Splits:
    """A hub dataset or a builder over local files (data.data_files, data.root)."""
    from datasets import ClassLabel
    from datasets import Image as HFImage

    name = cfg.dataset or _builder_for(given_files(cfg))
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
    if files := given_files(cfg):
        kwargs["data_files"] = files
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


def given_files(cfg: DataConfig) -> dict[str, Any]:
    """data.data_files without the splits left empty (the config lists train, validation
    and test as null, so that `data.data_files.train=PATH` works without a `+`)."""
    files = _plain(cfg.data_files) or {}
    return {split: value for split, value in files.items() if value is not None}


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
