"""Streamed parquet shards (ImageNet-21k, JFT-scale data), each byte read about once per
node per epoch.

The unit of reading is a parquet row group. At setup, the files' footers give every row
group's rows and bytes; nothing else is read. An epoch is a plan, a pure function of
(seed, epoch, world size, loader workers, batch size):

1. the row groups (cut to the rows in play: after the held-out head, within data.subset)
   are put in an order drawn from (seed, epoch) and their rows laid end to end;
2. rank r takes the r-th of world_size equal contiguous ranges, and whole batches of it:
   every rank gets the same number of batches, and the rows beyond them (fewer than
   world_size + one batch per rank) are left out, different ones each epoch;
3. a rank's batches go to its readers (the loader workers) in turn, as the DataLoader
   takes them: reader v makes batches v, v + V, v + 2V, ... from its own contiguous range
   of rows, which it reads row group by row group through a shuffle buffer.

A reader opens only the row groups its range touches, so an epoch reads the shards once,
plus at most one row group per boundary between two readers (ranks x workers - 1 in all).
A resumed epoch skips the batches a killed run consumed: each reader reads, but does not
decode, the rows of its skipped batches. The batches depend on the world size and the
number of loader workers; with the same ones, a run is reproduced exactly. A row's
augmentation seed is a function of (seed, epoch, row), its row the position in the files.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vitexp.data.images import ImageDecoder
from vitexp.errors import DataError

log = logging.getLogger("vitexp")


class RowGroup(NamedTuple):
    file: str
    index: int  # the row group's index in its file
    first: int  # the row id of its first row: rows are numbered through the files in order
    rows: int
    nbytes: int  # compressed bytes of the columns read


class Segment(NamedTuple):
    """Rows start..stop-1 of row group `group` (an index into ParquetShards.groups)."""

    group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class ParquetShards:
    """The row groups of a split's parquet files, read from their footers.

    Local paths and fsspec URLs (s3://, gs://, hf://) are opened with fsspec."""

    files: list[str]
    columns: tuple[str, str]  # (image, label)
    name: str  # names the split in messages
    groups: list[RowGroup]
    schema: Any  # pyarrow.Schema of the first file

    @classmethod
    def open(cls, files: Sequence[str], columns: tuple[str, str], name: str) -> ParquetShards:
        groups: list[RowGroup] = []
        schema = None
        first = 0
        for path in files:
            try:
                meta = footer(str(path))
            except OSError as err:
                raise DataError(
                    f"{name}: cannot read {path} ({err}); check data.data_files"
                ) from None
            except Exception as err:  # noqa: BLE001 - pyarrow's ArrowInvalid and kin
                raise DataError(
                    f"{name}: {path} is not a readable parquet file ({type(err).__name__}: "
                    f"{str(err).splitlines()[0]}); repair or remove it"
                ) from None
            if schema is None:
                schema = meta.schema.to_arrow_schema()
                _check_columns(schema, columns, name)
            for i in range(meta.num_row_groups):
                group = meta.row_group(i)
                nbytes = sum(
                    group.column(c).total_compressed_size
                    for c in range(group.num_columns)
                    if group.column(c).path_in_schema.split(".")[0] in columns
                )
                groups.append(RowGroup(str(path), i, first, group.num_rows, nbytes))
                first += group.num_rows
        return cls(list(map(str, files)), columns, name, groups, schema)

    @property
    def num_rows(self) -> int:
        return sum(g.rows for g in self.groups)

    def segments(self, lo: int, hi: int) -> list[Segment]:
        """Rows lo..hi-1 (row ids) as segments of their row groups, in file order."""
        out = []
        for k, g in enumerate(self.groups):
            start, stop = max(lo, g.first) - g.first, min(hi, g.first + g.rows) - g.first
            if start < stop:
                out.append(Segment(k, start, stop))
        return out

    def read(self, segments: Sequence[Segment]) -> Iterator[tuple[int, Any, Any]]:
        """(row id, image value, label) of the segments' rows, reading each row group once
        (consecutive segments of one group share the read)."""
        import pyarrow.parquet as pq

        image, label = self.columns
        cached: tuple[int, Any] | None = None
        for seg in segments:
            if cached is None or cached[0] != seg.group:
                g = self.groups[seg.group]
                with _open(g.file) as f:
                    data = pq.ParquetFile(f, metadata=footer(g.file))
                    table = data.read_row_group(g.index, columns=list(self.columns))
                cached = (seg.group, table)
            part = cached[1].slice(seg.start, seg.rows)
            first = self.groups[seg.group].first + seg.start
            values, labels = part.column(image).to_pylist(), part.column(label).to_pylist()
            for k, (value, y) in enumerate(zip(values, labels, strict=True)):
                yield first + k, value, y

    def bytes_of(self, segments: Sequence[Segment]) -> int:
        """Bytes a reader of `segments` reads: each distinct row group once."""
        return sum(self.groups[k].nbytes for k in {s.group for s in segments})


def _open(path: str):
    import fsspec

    return fsspec.open(path, "rb").open()


@functools.lru_cache(maxsize=256)
def footer(path: str) -> Any:
    """A parquet file's metadata, reading its footer's bytes and no more (pyarrow reads the
    file's last 64 KiB, which on small row groups doubles what an epoch reads); kept for
    the row groups of the same file that follow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(path) as f:
        f.seek(-8, 2)
        tail = f.read(8)
        if len(tail) != 8 or tail[4:] != b"PAR1":
            raise ValueError("no parquet footer at the end of the file")
        size = int.from_bytes(tail[:4], "little")
        f.seek(-8 - size, 2)
        meta = f.read(size)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + meta + tail))


def _check_columns(schema: Any, columns: tuple[str, str], name: str) -> None:
    for key, col in zip(("image_column", "label_column"), columns, strict=True):
        if col not in schema.names:
            raise DataError(
                f"data.{key}={col!r} is not a column of {name} (columns: "
                f"{', '.join(schema.names)}); set data.{key}"
            )


def cut(segments: Sequence[Segment], sizes: Sequence[int]) -> list[list[Segment]]:
    """The rows of `segments`, laid end to end, cut into consecutive parts of `sizes` rows
    (their sum at most the rows there are)."""
    parts: list[list[Segment]] = []
    queue = iter(segments)
    current: Segment | None = None
    for size in sizes:
        part = []
        while size > 0:
            current = current or next(queue)
            take = min(size, current.rows)
            part.append(current._replace(stop=current.start + take))
            size -= take
            current = current._replace(start=current.start + take) if take < current.rows else None
        parts.append(part)
    return parts


def _split_evenly(n: int, parts: int) -> list[int]:
    return [n // parts + (k < n % parts) for k in range(parts)]


def batch_readers(batches: int, readers: int) -> list[int]:
    """How many of a rank's batches each reader makes: v, v + V, v + 2V, ..."""
    return [len(range(v, batches, readers)) for v in range(readers)]


def epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.blake2b(repr((seed, epoch)).encode(), digest_size=7).digest()
    return int.from_bytes(digest)


@dataclass(frozen=True)
class EpochPlan:
    """Which rows each reader of each rank reads in one epoch (see the module docstring)."""

    readers: list[list[list[Segment]]]  # [rank][reader] -> segments, in reading order
    batches: int  # per rank (training); 0 for evaluation, which keeps every row
    left_out: int  # rows of the epoch in no batch (training)

    @classmethod
    def make(
        cls,
        segments: Sequence[Segment],
        world: int,
        readers: int,
        batch_size: int,
        order_seed: int | None,
    ) -> EpochPlan:
        """Training (an order_seed): shuffled row groups, equal whole batches per rank.
        Evaluation (None): file order, every row once, ranks differing by at most one row."""
        segments = list(segments)
        total = sum(s.rows for s in segments)
        if order_seed is None:
            ranks = cut(segments, _split_evenly(total, world))
            plan = [cut(r, _split_evenly(sum(s.rows for s in r), readers)) for r in ranks]
            return cls(plan, 0, 0)
        rng = np.random.default_rng(order_seed)
        segments = [segments[k] for k in rng.permutation(len(segments))]
        per_rank = total // world
        batches = per_rank // batch_size
        counts = [n * batch_size for n in batch_readers(batches, readers)]
        plan = [cut(r, counts) for r in cut(segments, [per_rank] * world)]
        return cls(plan, batches, total - world * batches * batch_size)


# --- datasets ------------------------------------------------------------------------------
def row_name(value: Any, fallback: str) -> str:
    path = (
        value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    )
    return path or fallback


def check_label(value: Any, n: int, row: str) -> int:
    """A row's label, refused (one line) outside 0..num_classes-1."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < n:
        return int(value)
    raise DataError(
        f"{row}: label {value!r} is outside 0..{n - 1} (data.num_classes={n}); fix the row "
        "or set data.num_classes"
    )


class RowsSplit(Dataset):
    """Raw rows (image value, label) held in memory: the head of a stream used for eval."""

    def __init__(self, rows: list[tuple[Any, int]], decoder: ImageDecoder, name: str) -> None:
        self.rows, self.decoder, self.name = rows, decoder, name
        self.labels = np.array([label for _, label in rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        value, label = self.rows[i]
        return self.decoder(value, row_name(value, f"{self.name}[{i}]")), label


def shuffle_buffer(items, size: int, rng: np.random.Generator):
    """A shuffle buffer of `size` items: each incoming item replaces a random one, which is
    yielded; the rest are yielded in random order at the end."""
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


class ParquetStream(IterableDataset):
    """Rows lo..hi-1 of a split's parquet shards, yielding (PIL | None, label, sample_seed).

    `configure(rank, world_size, shuffle_seed)` returns the copy for one rank: with a seed
    (training) the epoch plan shuffles and makes equal whole batches on every rank, without
    (evaluation) every row is kept, in file order. `start_at(epoch, batches, batch_size)`
    sets how many batches of that epoch a resumed run skips.
    """

    def __init__(
        self,
        shards: ParquetShards,
        num_classes: int,
        decoder: ImageDecoder,
        lo: int = 0,
        hi: int | None = None,
        shuffle_rows: int = 10_000,
        batch_size: int = 1,
    ) -> None:
        self.shards, self.num_classes, self.decoder = shards, num_classes, decoder
        self.lo, self.hi = lo, shards.num_rows if hi is None else hi
        self.shuffle_rows, self.batch_size = shuffle_rows, batch_size
        self.rank, self.world_size, self.seed, self.epoch = 0, 1, 0, 0
        self.train = False
        self._start: tuple[int, int] | None = None  # (epoch, batches consumed)

    @property
    def name(self) -> str:
        return self.shards.name

    @property
    def num_rows(self) -> int:
        return self.hi - self.lo

    def rows(self, lo: int, hi: int) -> ParquetStream:
        """A copy over rows lo..hi-1 of the same shards (the held-out head, data.subset)."""
        out = _copy(self)
        out.lo, out.hi = lo, hi
        return out

    def batches_per_rank(self, world_size: int, batch_size: int) -> int:
        return self.num_rows // world_size // batch_size

    def configure(self, rank: int, world_size: int, shuffle_seed: int | None) -> ParquetStream:
        out = _copy(self)
        out.rank, out.world_size = rank, world_size
        out.train, out.seed = shuffle_seed is not None, shuffle_seed or 0
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, epoch: int, batches: int, batch_size: int) -> None:
        self._start, self.batch_size = (epoch, batches), batch_size

    def plan(self, epoch: int, readers: int) -> EpochPlan:
        seed = epoch_seed(self.seed, epoch) if self.train else None
        segments = self.shards.segments(self.lo, self.hi)
        return EpochPlan.make(segments, self.world_size, readers, self.batch_size, seed)

    def describe(self, readers: int) -> str:
        """One line on what an epoch reads and leaves out (the training log's)."""
        plan = self.plan(self.epoch, readers)
        in_play = self.shards.bytes_of(self.shards.segments(self.lo, self.hi))
        read = sum(self.shards.bytes_of(r) for rank in plan.readers for r in rank)
        factor = read / max(1, in_play)
        left_out = (
            f"{plan.left_out} rows left out, different ones each epoch"
            if plan.left_out
            else "no row left out"
        )
        line = (
            f"streamed {self.name}: {self.num_rows} rows in {len(self.shards.groups)} row "
            f"groups of {len(self.shards.files)} files; each of {self.world_size} ranks takes "
            f"{plan.batches} batches of {self.batch_size} per epoch ({left_out}); {readers} "
            f"readers per rank read {factor:.2f}x the shards' bytes per epoch"
        )
        if factor > 1.5:
            line += (
                " (row groups larger than a reader's share are read by several readers: "
                "write the shards with smaller row groups, or lower data.num_workers)"
            )
        return line

    def __len__(self) -> int:
        """Rows this rank yields in a training epoch (whole batches)."""
        return self.batches_per_rank(self.world_size, self.batch_size) * self.batch_size

    def __iter__(self):
        worker = get_worker_info()
        wid, nw = (worker.id, worker.num_workers) if worker else (0, 1)
        if worker is not None:
            import fsspec.asyn

            fsspec.asyn.reset_lock()  # a lock forked from the parent would hang
        plan = self.plan(self.epoch, nw)
        if not self.train:
            return self._items(plan.readers[self.rank][wid], np.random.default_rng(0), 0)
        if plan.batches == 0:
            raise DataError(
                f"{self.name}: the stream has fewer rows than data.batch_size x devices = "
                f"{self.batch_size} x {self.world_size}; lower data.batch_size"
            )
        # after a resume at batch c the DataLoader starts again with worker 0, which must
        # deliver batch c: worker w plays reader (w + c) % nw and skips its batches below c
        consumed = self._start[1] if self._start and self._start[0] == self.epoch else 0
        reader = (wid + consumed) % nw
        skip = len(range(reader, consumed, nw)) * self.batch_size
        rng = np.random.default_rng([epoch_seed(self.seed, self.epoch), self.rank, reader])
        return self._items(plan.readers[self.rank][reader], rng, skip)

    def _items(self, segments: list[Segment], rng: np.random.Generator, skip: int):
        rows = self.shards.read(segments)
        if self.train:
            rows = shuffle_buffer(rows, self.shuffle_rows, rng)
        base = epoch_seed(self.seed, self.epoch)
        for i, value, label in itertools.islice(rows, skip, None):
            row = row_name(value, f"{self.name}[{i}]")
            seed = (base + i * 0x9E3779B1) % (1 << 62)
            label = check_label(label, self.num_classes, row)
            yield self.decoder(value, row), label, seed


def _copy(stream: ParquetStream) -> ParquetStream:
    import copy

    return copy.copy(stream)
