"""Hugging Face `datasets` as a source: hub names or builders over local files, in memory,
or (data.streaming=true) their parquet shards streamed by `parquet.ParquetStream`, the
route for ImageNet-21k and JFT-scale data."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitexp.data.config import DataConfig
from vitexp.data.images import ImageDecoder
from vitexp.data.parquet import ParquetShards, ParquetStream, RowsSplit, check_label, row_name
from vitexp.data.sources import HF_BUILDERS, Splits, _fractions
from vitexp.errors import DataError

log = logging.getLogger("vitexp")


class HFSplit(Dataset):
    """Rows of a (map-style) Hugging Face dataset; the image column is decoded here."""

    def __init__(self, ds: Any, column: str, labels: np.ndarray, decoder: ImageDecoder, name: str):
        self.ds, self.column, self.decoder, self.name = ds, column, decoder, name
        self.labels = np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        value = self.ds[int(i)][self.column]
        return self.decoder(value, row_name(value, f"{self.name}[{int(i)}]")), int(self.labels[i])


# --- Hugging Face datasets ---------------------------------------------------------------
def load_hf(cfg: DataConfig, decoder: ImageDecoder) -> Splits:
    """A hub dataset or a builder over local files (data.data_files, data.root)."""
    from datasets import ClassLabel
    from datasets import Image as HFImage

    if cfg.streaming:
        return _hf_streaming(cfg, decoder)
    name = cfg.dataset or _builder_for(given_files(cfg))
    origin = f"data.dataset={name}"
    dd = _hf_load(cfg, name)
    _check_splits(cfg, dd, origin)
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
    kwargs: dict[str, Any] = {}
    if files := given_files(cfg):
        _check_local_files(files)
        kwargs["data_files"] = files
    if cfg.root:
        kwargs["data_dir" if local_builder else "cache_dir"] = str(Path(cfg.root).expanduser())
    try:
        with _offline(not cfg.download):
            dd = load_dataset(name, **kwargs)
    except Exception as err:  # datasets raises many types (FileNotFound, Connection, Value...)
        raise _load_error(name, err) from None
    if not hasattr(dd, "keys"):
        raise DataError(
            f"data.dataset={name} loaded a single split; give data.data_files per split"
        )
    return dd


def _load_error(name: str, err: Exception) -> DataError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(
        f"data.dataset={name} could not be loaded ({type(err).__name__}: {first}); check "
        "data.dataset, data.data_files and data.root, and that hub data is cached "
        "(or set data.download=true)"
    )


def _check_splits(cfg: DataConfig, splits: Any, origin: str) -> None:
    for key in ("train_split", "val_split", "test_split"):
        split = getattr(cfg, key)
        if split is not None and split not in splits:
            raise DataError(
                f"data.{key}={split!r} is not a split of {origin} (it has "
                f"{', '.join(splits)}); set data.{key} to one of them"
                + ("" if key == "train_split" else " or null")
            )


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


def _check_local_files(files: dict[str, Any]) -> None:
    """Name the split whose local file pattern matches nothing (datasets would only say
    that "all the data_files are invalid")."""
    import glob

    for split, patterns in files.items():
        for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
            local = "://" not in str(pattern)
            if local and not glob.glob(str(Path(str(pattern)).expanduser())):
                raise DataError(
                    f"data.data_files.{split}={pattern} matches no file; check data.root "
                    "and data.data_files (the presets read ${data.root}/<split>-*.parquet)"
                )


def _builder_for(data_files: Any) -> str:
    """The packaged builder for data files given without data.dataset (by extension)."""
    files = _plain(data_files)
    while isinstance(files, (dict, list, tuple)):
        files = next(iter(files.values() if isinstance(files, dict) else files))
    ext = Path(str(files)).suffix.lower()
    builders = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}
    builders |= {".jsonl": "json", ".tar": "webdataset"}
    return builders.get(ext, "imagefolder")


def _stream_files(cfg: DataConfig, name: str) -> dict[str, list[str]]:
    """The parquet files of each split, as `datasets` resolves them (globs, hub datasets,
    fsspec URLs); a stream reads nothing else through `datasets`."""
    from datasets import load_dataset_builder

    kwargs: dict[str, Any] = {}
    if files := given_files(cfg):
        _check_local_files(files)
        kwargs["data_files"] = files
    if cfg.root:
        local_builder = name in HF_BUILDERS or Path(name).expanduser().is_dir()
        kwargs["data_dir" if local_builder else "cache_dir"] = str(Path(cfg.root).expanduser())
    try:
        with _offline(not cfg.download):
            builder = load_dataset_builder(name, **kwargs)
    except Exception as err:  # datasets raises many types (FileNotFound, Connection, Value...)
        raise _load_error(name, err) from None
    if builder.name != "parquet":
        raise DataError(
            f"data.dataset={name}: data.streaming=true reads parquet shards, and these are "
            f"{builder.name} files; pack them (python -m vitexp.pack src=... out=DIR, then "
            "data=litdata data.root=DIR) or set data.streaming=false"
        )
    return {split: [str(f) for f in found] for split, found in builder.config.data_files.items()}


def _stream_class_names(cfg: DataConfig, schema: Any, origin: str) -> list[str]:
    """A ClassLabel's names (from the features `datasets` stores in the parquet schema); for
    an integer column, "0".."num_classes-1" from data.num_classes, each row checked when
    read (a stream is not counted up front)."""
    from datasets import ClassLabel, Features, Value

    feature = Features.from_arrow_schema(schema).get(cfg.label_column)
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    if isinstance(feature, Value) and "int" in feature.dtype:
        if cfg.num_classes is None:
            raise DataError(
                f"{origin}: the label column {cfg.label_column} holds plain integers and a "
                "stream cannot be counted up front; set data.num_classes"
            )
        return [str(i) for i in range(cfg.num_classes)]
    raise DataError(
        f"{origin}: streaming needs a ClassLabel or integer label column (data.label_column="
        f"{cfg.label_column} is {feature}); map it to integers or set data.streaming=false"
    )


def _hf_streaming(cfg: DataConfig, decoder: ImageDecoder) -> Splits:
    """data.streaming=true: each split's parquet shards read in row groups
    (`parquet.ParquetStream`); val/test without a split of their own are the first
    val_size (then the next val_size) rows of train, held in memory, and train starts
    after them."""
    name = cfg.dataset or _builder_for(given_files(cfg))
    origin = f"data.dataset={name}"
    files = _stream_files(cfg, name)
    _check_splits(cfg, files, origin)
    columns = (cfg.image_column, cfg.label_column)

    def shards(split: str) -> ParquetShards:
        return ParquetShards.open(files[split], columns, f"{origin}[{split}]")

    train = shards(cfg.train_split)
    names = _stream_class_names(cfg, train.schema, origin)
    stream = ParquetStream(
        train, len(names), decoder, shuffle_rows=cfg.shuffle_buffer, batch_size=cfg.batch_size
    )
    held: dict[str, Dataset] = {}
    head = 0  # train rows taken for val/test
    for key in ("val_split", "test_split"):
        if (split := getattr(cfg, key)) is not None:
            held[key] = ParquetStream(shards(split), len(names), decoder)
            continue
        where = f"{origin}[{cfg.train_split} head]"
        rows = [
            (value, check_label(label, len(names), row_name(value, f"{where}[{i}]")))
            for i, value, label in train.read(train.segments(head, head + cfg.val_size))
        ]
        head += len(rows)
        held[key] = RowsSplit(rows, decoder, where)
    return Splits(
        stream.rows(head, train.num_rows), held["val_split"], held["test_split"], names, origin
    )
