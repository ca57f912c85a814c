"""Hugging Face `datasets` as a source: hub names or builders over local files, in memory
or streamed (the route for ImageNet-21k and JFT-scale parquet shards)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vitexp.config import DataConfig
from vitexp.data.images import ImageDecoder
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
        _check_local_files(files)
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


def _row_name(value: Any, fallback: str) -> str:
    path = (
        value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    )
    return path or fallback


def _row_key(value: Any) -> bytes:
    """Identity of a stream row (its path, else a hash of its bytes), to keep held-out rows
    out of train whatever the order."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return hashlib.blake2b(value["bytes"], digest_size=16).digest()
    return str(_row_name(value, repr(value))).encode()


def _row_size(value: Any) -> int:
    return len(value["bytes"]) if isinstance(value, dict) and value.get("bytes") else -1


class HeldOut:
    """The rows that val/test took from the head of train, which train drops wherever the
    shuffle puts them. A row's bytes are hashed only when their length is that of a held-out
    row: every row of every epoch passes through here."""

    def __init__(self, values: list[Any]) -> None:
        self.count = len(values)
        self.sizes = {_row_size(v) for v in values}
        self.keys = {_row_key(v) for v in values}

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __contains__(self, value: Any) -> bool:
        return _row_size(value) in self.sizes and _row_key(value) in self.keys


def _label(value: Any, n: int, row: str) -> int:
    """A row's label, refused (one line) outside 0..num_classes-1."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < n:
        return int(value)
    raise DataError(
        f"{row}: label {value!r} is outside 0..{n - 1} (data.num_classes={n}); fix the row "
        "or set data.num_classes"
    )


def _stream_class_names(cfg: DataConfig, feature: Any, origin: str) -> list[str]:
    """A ClassLabel's names; for an integer column (a stream has no cheap way to see all
    values), "0".."num_classes-1" from data.num_classes, each row checked when read."""
    from datasets import ClassLabel, Value

    if isinstance(feature, ClassLabel):
        return list(feature.names)
    if feature is None or (isinstance(feature, Value) and "int" in feature.dtype):
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


def _hf_streaming(cfg, dd, prepare, names, decoder, origin) -> Splits:
    """Streaming: train is a StreamSplit; val/test without their own split are the first
    val_size (then the next val_size) rows of train, held in memory, and train drops them."""
    features = dd[cfg.train_split].features or {}
    names = names or _stream_class_names(cfg, features.get(cfg.label_column), origin)
    train = prepare(dd[cfg.train_split])
    held: dict[str, Dataset] = {}
    head = iter(train)
    taken: list[Any] = []
    for key in ("val_split", "test_split"):
        split = getattr(cfg, key)
        if split is not None:
            held[key] = StreamSplit(
                prepare(dd[split]), cfg, len(names), decoder, f"{origin}[{split}]"
            )
            continue
        where = f"{origin}[{cfg.train_split} head]"
        rows = []
        for r in itertools.islice(head, cfg.val_size):
            value = r[cfg.image_column]
            row = _row_name(value, f"{where}[{len(taken) + len(rows)}]")
            rows.append((value, _label(r[cfg.label_column], len(names), row)))
        taken += [value for value, _ in rows]
        held[key] = RowsSplit(rows, decoder, where)
    where = f"{origin}[{cfg.train_split}]"
    stream = StreamSplit(train, cfg, len(names), decoder, where, HeldOut(taken))
    return Splits(stream, held["val_split"], held["test_split"], list(names), origin)


def _buffer_shuffle(items, size: int, rng: np.random.Generator):
    """A shuffle buffer of `size` items (as HF's): each incoming item replaces a random one,
    which is yielded; the rest are yielded in random order at the end."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)).tolist():
        yield buffer[j]


def _chunks(items, n: int):
    """Consecutive lists of n items; the last may be shorter."""
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


class StreamSplit(IterableDataset):
    """An HF streaming split yielding (PIL | None, label, sample_seed), the same rows in the
    same batches whatever the number of ranks' loader workers, and resumable exactly.

    `configure(rank, world_size, shuffle_seed)` returns the copy for one rank; with a seed
    (training) the stream is shuffled with data.shuffle_buffer, with a seed drawn from
    (seed, epoch), identically on every rank and worker. Row i of that stream (held-out head
    rows dropped) goes to rank i % world_size:

    - training keeps only complete rounds of world_size rows and complete batches, so every
      rank gets floor(N / world_size) rows and the same number of batches, and all ranks
      end each epoch together (whole shards per rank would leave a rank waiting in a
      collective, and over-represent small shards); up to world_size - 1 rows and up to a
      batch per rank are left out of each epoch, different ones each epoch;
    - evaluation keeps every row, no padding.

    Batch j of a rank is its rows j*B..(j+1)*B-1; loader worker w of nw yields the batches
    j >= start with (j - start) % nw == w, which the DataLoader, taking workers in turn,
    delivers as start, start+1, ...; `start_at(epoch, batches, batch_size)` sets start when
    a resumed epoch skips what a killed run consumed. The cost: every worker of every rank
    reads the raw bytes of the whole stream (cheap: no decoding, and no hashing unless a
    held-out head must be dropped) and decodes only its own rows. HF's own split of shards
    between loader workers is not used (it makes batches depend on shard sizes). A row's
    augmentation seed is a function of (seed, epoch, i).

    `first_rows(n)` (data.subset=n) keeps the first n rows of the unshuffled stream (the
    held-out head dropped): every epoch reads those rows again, shuffled among themselves
    with data.shuffle_buffer, and stops reading there; a stream with fewer rows is refused
    when an epoch reaches its end.
    """

    def __init__(
        self,
        ds: Any,
        cfg: DataConfig,
        num_classes: int,
        decoder: ImageDecoder,
        name: str,
        exclude: HeldOut | None = None,
    ) -> None:
        self.ds, self.decoder, self.name, self.exclude = ds, decoder, name, exclude
        self.image_column, self.label_column = cfg.image_column, cfg.label_column
        self.buffer, self.num_classes = cfg.shuffle_buffer, num_classes
        self.batch_size = cfg.batch_size  # the loader's; start_at says it again
        self.rank, self.world_size, self.seed, self.epoch = 0, 1, 0, 0
        self.train = False
        self.limit: int | None = None  # data.subset: the first `limit` rows only
        self._start: tuple[int, int] | None = None  # (epoch, batches consumed)

    def first_rows(self, n: int) -> StreamSplit:
        """A copy that reads only the first n rows (in stream order, held-out rows dropped)."""
        out = copy.copy(self)
        out.limit = int(n)
        return out

    def configure(self, rank: int, world_size: int, shuffle_seed: int | None) -> StreamSplit:
        out = copy.copy(self)
        out.train = shuffle_seed is not None
        if out.train and world_size > 1 and rank == 0:
            log.info(
                "streamed train data: rows interleaved across %d ranks (row i -> rank "
                "i %% %d), each rank reads every shard and decodes its own rows",
                world_size,
                world_size,
            )
        out.rank, out.world_size, out.seed = rank, world_size, shuffle_seed or 0
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, epoch: int, batches: int, batch_size: int) -> None:
        self._start, self.batch_size = (epoch, batches), batch_size

    def __iter__(self):
        worker = get_worker_info()
        wid, nw = (worker.id, worker.num_workers) if worker else (0, 1)
        start = self._start[1] if self._start and self._start[0] == self.epoch else 0
        return self._items(start, wid, nw)

    def _epoch_seed(self) -> int:
        digest = hashlib.blake2b(repr((self.seed, self.epoch)).encode(), digest_size=7).digest()
        return int.from_bytes(digest)

    def _stream(self):
        """(value, label) of every row, held-out ones dropped. `ds.iter` rather than
        `iter(ds)`: inside a loader worker the latter reads only that worker's shards."""
        if get_worker_info() is not None:
            import fsspec.asyn

            fsspec.asyn.reset_lock()  # as HF does in a worker: a forked lock would hang
        if self.limit is not None:  # data.subset: the same first rows, reshuffled per epoch
            rows = self._first_rows()
            if self.train:
                rng = np.random.default_rng(self._epoch_seed())
                rows = _buffer_shuffle(rows, self.buffer, rng)
            yield from rows
            return
        ds = self.ds
        if self.train:  # a fresh shuffle per epoch, not HF's set_epoch: that updates a
            # tensor shared by all loader workers without a lock, and concurrent workers
            # could leave it at twice the epoch (a different order in one worker)
            ds = ds.shuffle(seed=self._epoch_seed() % (1 << 32), buffer_size=self.buffer)
        yield from self._rows(ds)

    def _first_rows(self):
        """The first `limit` rows of the unshuffled stream; reading stops there."""
        count = 0
        with contextlib.closing(self._rows(self.ds)) as rows:
            for row in itertools.islice(rows, self.limit):
                count += 1
                yield row
        if count < self.limit:
            raise DataError(
                f"data.subset={self.limit} is more than the {count} training rows of "
                f"{self.name} (after the held-out head); lower data.subset"
            )

    def _rows(self, ds):
        """(value, label) of the rows of `ds`, held-out ones dropped."""
        for batch in ds.iter(batch_size=64):
            columns = batch[self.image_column], batch[self.label_column]
            for value, label in zip(*columns, strict=True):
                if not (self.exclude and value in self.exclude):
                    yield value, label

    def _items(self, start: int, wid: int, nw: int):
        world, rank, size = self.world_size, self.rank, self.batch_size
        mine = (  # (i, value, label) of this rank's rows
            (k * world + rank, *round_[rank])
            for k, round_ in enumerate(_chunks(self._stream(), world))
            if len(round_) > rank and (len(round_) == world or not self.train)
        )
        base = self._epoch_seed()
        batches = 0
        for j, batch in enumerate(_chunks(mine, size)):
            if self.train and len(batch) < size:
                break
            batches += 1
            if j < start or (j - start) % nw != wid:
                continue
            for i, value, label in batch:
                row = _row_name(value, f"{self.name}[{i}]")
                seed = (base + i * 0x9E3779B1) % (1 << 62)
                label = _label(label, self.num_classes, row)
                yield self.decoder(value, row), label, seed
        if self.train and batches == 0:
            raise DataError(
                f"{self.name}: the stream has fewer rows than data.batch_size x devices = "
                f"{size} x {world} (after the held-out head); lower data.batch_size"
            )
