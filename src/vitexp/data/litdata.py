"""`data.source=litdata`: a pack that `python -m vitexp.pack` wrote, read with Lightning's
litdata.

A pack (`data.root`) holds one litdata dataset per split (`train/`, `val/`, `test/`: chunks
and `index.json`), each with `labels.npy`, and `vitexp_pack.json` (class names, counts,
where each split came from), written last: a folder without it is a pack that did not
finish. Each row is (image bytes as packed, label, its index in the split, its source name).

Training streams the train split with litdata's `StreamingDataset(shuffle=True,
drop_last=True)` and a `StreamingDataLoader`: chunks are dealt to (rank, loader worker) so
that every rank gets floor(N / (batch x world)) whole batches; the order is a function of
(seed, epoch) for a given world size, worker count, batch size and file system kind (litdata
reads chunks in place on a local disk and in sequential windows on NFS/Lustre; both are
shuffled). Each image's augmentation is seeded by (seed, epoch, its index), and the loader's
state_dict, which Lightning saves in every checkpoint, makes a resumed epoch skip exactly the
batches that were consumed. Val, test (and the few-shot pools) are read by index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # never ask PyPI from a job

import numpy as np
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex
from litdata.utilities.env import _DistributedEnv
from PIL import Image
from torch.utils.data import Dataset

from vitexp.data.config import DataConfig
from vitexp.data.images import ImageDecoder
from vitexp.data.sources import Splits
from vitexp.errors import DataError

# litdata says at INFO, for every dataset each loader worker opens, how it reads (cache size,
# in-place mmap): lines by the dozen on the console, nothing a user acts on
logging.getLogger("litdata").setLevel(logging.WARNING)

MANIFEST = "vitexp_pack.json"  # written last: its presence means the pack is complete
STATE_DIR = ".vitexp_pack"  # an unfinished pack's plan and progress
FORMAT = 1
SPLITS = ("train", "val", "test")


def read_manifest(root: Path, key: str = "data.root") -> dict[str, Any]:
    """The manifest of a complete pack, or one DataError saying what `root` is instead."""
    make = f"python -m vitexp.pack src=... out={root}"
    if not root.is_dir():
        raise DataError(f"{key}={root} does not exist; pack the data there first: {make}")
    path = root / MANIFEST
    if not path.is_file():
        if (root / STATE_DIR).is_dir():
            raise DataError(
                f"{key}={root} is a pack that did not finish (no {MANIFEST}); re-run the "
                "same python -m vitexp.pack command: it continues where it stopped"
            )
        raise DataError(f"{key}={root} holds no vitexp pack ({MANIFEST}); make one: {make}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{key}={root}: {MANIFEST} is unreadable ({err}); re-pack") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(
            f"{key}={root}: {MANIFEST} is format {found!r}, this vitexp reads format {FORMAT}; "
            "re-pack the data with this version's python -m vitexp.pack"
        )
    return manifest


def repack_hint(root: Path, manifest: dict[str, Any]) -> str:
    src = manifest.get("args", {}).get("src", "SRC")
    return f"re-pack it: delete {root} and run python -m vitexp.pack src={src} out={root}"


def load_litdata(cfg: DataConfig, decoder: ImageDecoder) -> Splits:
    """The splits of the pack at data.root, each checked against its index (chunk files
    whole, counts matching) before anything is read."""
    if not cfg.root:
        raise DataError("data.root is not set; data.source=litdata reads a pack from there")
    if cfg.subset is not None:
        raise DataError(
            f"data.subset={cfg.subset!r} is not supported with data.source=litdata; pack the "
            "subset you want (python -m vitexp.pack) or use data=imagefolder / data=hf"
        )
    root = Path(cfg.root).expanduser()
    manifest = read_manifest(root)
    origin = f"data.root={root}"
    made = {}
    for split in SPLITS:
        info = manifest["splits"][split]
        if info["images"] == 0:
            raise DataError(
                f"{origin}: the pack has no {split} images ({info.get('from', '')}); re-pack "
                f"with {split}_fraction > 0 or a source with a {split} split"
            )
        made[split] = PackedSplit(root, split, decoder, origin, manifest)
    return Splits(made["train"], made["val"], made["test"], list(manifest["class_names"]), origin)


class PackedSplit(Dataset):
    """One split of a pack, by index: (PIL RGB | None, label). `labels` are known without
    reading a chunk. The litdata dataset is opened in the process that reads (a loader
    worker gets its own)."""

    def __init__(
        self, root: Path, split: str, decoder: ImageDecoder, origin: str, manifest: dict
    ) -> None:
        self.root, self.split, self.decoder, self.origin = root, split, decoder, origin
        self.dir = root / split
        self.hint = repack_hint(root, manifest)
        self.fingerprint = manifest.get("fingerprint")
        self.chunks = _checked_chunks(self.dir, f"{origin}: {split}/", self.hint)
        self.starts = np.cumsum([0] + [c["chunk_size"] for c in self.chunks])
        try:
            self.labels = np.load(self.dir / "labels.npy").astype(np.int64)
        except (OSError, ValueError) as err:
            raise DataError(
                f"{origin}: {split}/labels.npy is unreadable ({err}); {self.hint}"
            ) from None
        expected = manifest["splits"][split]["images"]
        if not len(self.labels) == self.starts[-1] == expected:
            raise DataError(
                f"{origin}: {split} has {expected} images in {MANIFEST}, {self.starts[-1]} in "
                f"its index and {len(self.labels)} labels; {self.hint}"
            )
        self._ds: StreamingDataset | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.labels)

    def batches_per_rank(self, world_size: int, batch_size: int) -> int:
        """Training batches per epoch on each rank: litdata deals whole batches, the same
        number to every rank, and leaves the rest of the epoch out."""
        return len(self) // (batch_size * world_size)

    def chunk_name(self, chunk: int) -> str:
        return f"{self.split}/{self.chunks[chunk]['filename']}"

    def _dataset(self) -> StreamingDataset:
        if self._ds is None or self._pid != os.getpid():
            self._ds, self._pid = StreamingDataset(str(self.dir)), os.getpid()
        return self._ds

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        chunk = int(np.searchsorted(self.starts, i, side="right")) - 1
        data, label, k, name = read_row(self._dataset().__getitem__, int(i), self, chunk)
        return self.decoder(data, self.row_name(k, name)), label

    def row_name(self, k: int, name: str) -> str:
        return f"{self.origin} {self.split}[{k}] ({name})"


def read_row(read: Callable, key: Any, split: PackedSplit, chunk: int):
    """(image bytes, label, index, source name) of a row; a chunk that fails is one line."""
    try:
        data, label, k, name = read(key)
        return bytes(data), int(label), int(k), str(name)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged chunk fails in many ways
        raise damaged(split, err, f"chunk {split.chunk_name(chunk)}") from None


def damaged(split: PackedSplit, err: Exception, what: str | None = None) -> DataError:
    """One line for a chunk that litdata could not read."""
    text = str(err).strip().splitlines()
    detail = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    what = what or f"the {split.split} split"
    return DataError(f"{split.origin}: {what} failed to read ({detail}); {split.hint}")


def _checked_chunks(folder: Path, where: str, hint: str) -> list[dict[str, Any]]:
    """The chunks of a split's index.json, each present with the size the index records
    (a truncated or missing chunk is found here, not mid-epoch)."""
    try:
        chunks = json.loads((folder / "index.json").read_text())["chunks"]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{where}index.json is missing or unreadable ({err}); {hint}") from None
    for chunk in chunks:
        path = folder / chunk["filename"]
        size = path.stat().st_size if path.is_file() else None
        if size != chunk["chunk_bytes"]:
            said = chunk["chunk_bytes"]
            found = "missing" if size is None else f"{size} bytes, its index says {said}"
            raise DataError(
                f"{where}{chunk['filename']} is {found} (truncated or replaced); {hint}"
            )
    return chunks


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of a row in an epoch: the same whatever rank or worker reads it."""
    text = f"{seed},{epoch},{index}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest()) >> 2


# --- training ----------------------------------------------------------------------------------
class TrainStream(StreamingDataset):
    """The train split shuffled by litdata, yielding transformed samples: `apply(item, seed)`
    is the datamodule's (PIL, label) -> (tensor, label) with a seeded random transform."""

    def __init__(self, split: PackedSplit, seed: int, apply: Callable, env: _DistributedEnv):
        super().__init__(str(split.dir), shuffle=True, drop_last=True, seed=seed % 2**32)
        self.distributed_env = env  # from the trainer, not guessed from the environment
        self.split, self.apply, self.train_seed = split, apply, seed

    def __iter__(self) -> TrainStream:
        try:
            return super().__iter__()
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - litdata checks chunk headers here
            raise damaged(self.split, err) from None

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except (DataError, StopIteration):
            raise
        except Exception as err:  # noqa: BLE001
            raise damaged(self.split, err) from None

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, ChunkedIndex):
            return super().__getitem__(index)
        read = super().__getitem__
        data, label, k, name = read_row(read, index, self.split, index.chunk_index)
        img = self.split.decoder(data, self.split.row_name(k, name))
        return self.apply((img, label), sample_seed(self.train_seed, self.current_epoch, k))


class TrainLoader(StreamingDataLoader):
    """litdata's loader, whose `state_dict` Lightning saves with each checkpoint and gives
    back before a resumed epoch (litdata then replays the consumed batches' positions
    without reading them). The epoch is Lightning's: its `set_epoch` reaches the loader
    through `sampler`, and a fresh epoch starts from it (litdata counts from 1).

    The state names the pack by its fingerprint rather than its path (litdata's own check):
    a requeued job may find the same pack elsewhere (a copy on node-local scratch), but
    another pack must not continue a half-finished epoch."""

    def __init__(self, dataset: TrainStream, **kwargs: Any) -> None:
        super().__init__(dataset, persistent_workers=False, **kwargs)  # workers see set_epoch
        object.__setattr__(self, "sampler", _EpochRelay())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pack": self.dataset.split.fingerprint}

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        split = self.dataset.split
        if obj.get("pack") != split.fingerprint:
            raise DataError(
                f"the checkpoint's train loader read another pack than {split.origin} (its "
                "fingerprint differs); resume with the pack the run was trained on"
            )
        state = {**obj["dataset"], "input_dir_path": self.dataset.input_dir.path}
        super().load_state_dict({**obj, "dataset": state})

    def __iter__(self):
        if not self.restore:  # not resuming mid-epoch: the epoch Lightning set
            self.current_epoch = self.sampler.epoch  # litdata's __iter__ adds one
        try:
            yield from super().__iter__()
        except DataError as err:  # from a worker: "Caught DataError ... Traceback ... <msg>"
            last = str(err).strip().splitlines()[-1]
            raise DataError(last.removeprefix("vitexp.errors.DataError: ")) from None


class _EpochRelay:
    """Stands in for the loader's sampler: Lightning calls `set_epoch` on it."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def train_loader(
    split: PackedSplit,
    rank: int,
    world_size: int,
    num_nodes: int,
    seed: int,
    apply: Callable,
    **loader_kwargs: Any,
) -> TrainLoader:
    env = _DistributedEnv(world_size=world_size, global_rank=rank, num_nodes=num_nodes)
    return TrainLoader(TrainStream(split, seed, apply, env), **loader_kwargs)
