"""`ImageDataModule`: one LightningDataModule for every source, deterministic and resumable.

Splits per source (`data.source`; held-out fractions are seeded by data.seed, stratified):
  digits       test = test_fraction of all, val = val_fraction of the rest
  shapes       generated: data.shapes.num_train / num_val / num_test
  torchvision  val = val_fraction of the official train split, test = the official test split
  imagefolder  root/train/ + root/test/ (+ root/val/, else a fraction of train); without
               test/, root/val/ is the test set (the ImageNet convention); a flat
               root/<class>/ is split by fractions
  hf           data.train_split / val_split / test_split, fractions where a split is null;
               streaming: a null val (test) split is the first (next) val_size rows of
               train, held in memory, which the train stream drops
  litdata      a pack's train/ val/ test/ (python -m vitexp.pack; vitexp.data.litdata)

`data.subset` then keeps a fixed part of the train split only (val and test never change):
map-style splits keep a class-balanced subset (`sources.subset_order`: each class the same
number of images as far as its size allows, seeded by data.subset_seed alone, so every
model and training seed sees the same images, and a smaller subset is part of every larger
one); a stream keeps its first N rows after the held-out head, read again every epoch
(`parquet.ParquetStream.rows`). `train_images` is the resulting count.

Training order is a permutation that depends only on (seed, epoch), sharded by rank, and
each sample's augmentation is seeded by (seed, epoch, index): results do not depend on the
number of workers, and the train loader saves how far into the epoch it got, so a run
resumed mid-epoch from a checkpoint sees exactly the batches the killed run would have.
A streamed train split (`parquet.ParquetStream`) gives each (rank, loader worker) its own
row groups, every rank the same number of whole batches, and resumes as exactly; its
batches depend on the world size and the number of loader workers as well.
A corrupt image skipped under data.on_corrupt=skip leaves its batch one short; a batch with
nothing left is (0, 3, H, W) images and (0,) labels.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from vitexp.data import gpu_decode, hf, images, sources
from vitexp.data import litdata as packs
from vitexp.data.config import SOURCES, DataConfig, check_subset
from vitexp.data.parquet import ParquetStream
from vitexp.data.transforms import build_transforms
from vitexp.errors import DataError

SPLITS = ("train", "val", "test")
log = logging.getLogger("vitexp")


class ImageDataModule(L.LightningDataModule):
    """Batches of (images float32 (B, 3, H, W) normalised with mean/std, labels int64 (B,)).

    Args:
        cfg: the data config.
        img_size: the model's (height, width).
        mean, std: the model's input normalisation.
        seed: the training seed (order and augmentation); cfg.seed fixes the held-out splits.
    """

    def __init__(
        self,
        cfg: DataConfig,
        img_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.mean, self.std = list(mean), list(std)
        self.seed = seed
        self._splits: sources.Splits | None = None
        self._subset_note: str | None = None  # the line logged when a subset is used
        self._device_stage: gpu_decode.DeviceStage | None = None  # data.decode=gpu

    # --- splits ----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download (only with data.download=true), once per node."""
        if self.cfg.download and self.cfg.source in ("torchvision", "hf"):
            self._build()

    def setup(self, stage: str | None = None) -> None:
        self._build()

    def _build(self) -> sources.Splits:
        if self._splits is None:
            splits = self._load()
            if self.cfg.classes is not None:
                splits = sources.keep_classes(splits, list(self.cfg.classes))
            n = len(splits.class_names)
            if self.cfg.num_classes is not None and n != self.cfg.num_classes:
                shown = ", ".join(splits.class_names[:10]) + (", ..." if n > 10 else "")
                raise DataError(
                    f"data.num_classes={self.cfg.num_classes} but {splits.origin} has {n} "
                    f"classes ({shown}); set data.num_classes={n}"
                )
            if not isinstance(splits.train, IterableDataset) and len(splits.train) == 0:
                raise DataError(f"{splits.origin}: the train split is empty; add data")
            self._splits = self._take_subset(splits)
        return self._splits

    def _take_subset(self, splits: sources.Splits) -> sources.Splits:
        """The train split cut to data.subset (after the val/test holdout)."""
        cfg, train = self.cfg, splits.train
        if cfg.subset is None:
            return splits
        check_subset(cfg, "data", DataError)  # also a DataConfig that validate() never saw
        if isinstance(train, ParquetStream):
            if cfg.subset > train.num_rows:
                raise DataError(
                    f"data.subset={cfg.subset} is more than the {train.num_rows} training rows "
                    f"of {train.name} (after the held-out head); lower data.subset"
                )
            head = train.lo
            where = f"after its {head} held-out head rows" if head else "from its first row"
            self._subset_note = (
                f"data.subset={cfg.subset}: the first {cfg.subset} rows of the unshuffled "
                f"stream {train.name} {where}, the same rows every epoch, shuffled among "
                "themselves (data.subset_seed does not apply to a stream)"
            )
            return replace(splits, train=train.rows(head, head + cfg.subset))
        total = len(train)
        size = cfg.subset if type(cfg.subset) is int else max(1, round(cfg.subset * total))
        if size > total:
            raise DataError(
                f"data.subset={cfg.subset} is more than the {total} training images of "
                f"{splits.origin} (after the validation/test holdout); lower data.subset"
            )
        kept = sources.balanced_subset(train.labels, size, cfg.subset_seed)
        self._subset_note = (
            f"data.subset={cfg.subset}: {size} of {total} training images "
            f"(class-balanced, subset_seed {cfg.subset_seed})"
        )
        return replace(splits, train=sources.SubsetSplit(train, kept))

    @property
    def train_images(self) -> int:
        """Training images after data.subset (a stream: its rows, counted in the footers)."""
        train = self._build().train
        return train.num_rows if isinstance(train, ParquetStream) else len(train)

    def _load(self) -> sources.Splits:
        cfg, source = self.cfg, self.cfg.source
        if source == "digits":
            return sources.load_digits(cfg)
        if source == "fashion_mnist":
            return sources.load_fashion_mnist(cfg)
        if source == "shapes":
            return sources.load_shapes(cfg, self.img_size)
        if source == "torchvision":
            return sources.load_torchvision(cfg)
        decoder = self._decoder()
        if source == "imagefolder":
            return sources.load_imagefolder(cfg, decoder)
        if source == "hf":
            return hf.load_hf(cfg, decoder)
        if source == "litdata":
            return packs.load_litdata(cfg, decoder)
        raise DataError(f"data.source={source!r} is not one of {', '.join(SOURCES)}")

    def _decoder(self) -> images.ImageDecoder:
        """What every source that reads encoded images decodes them with, `decoder(value,
        name)`: PIL in the loader workers (data.decode=cpu), or JPEGs left encoded for the
        device (data.decode=gpu: vitexp.data.gpu_decode)."""
        cls = gpu_decode.DeferredDecoder if self.cfg.decode == "gpu" else images.ImageDecoder
        return cls(self.cfg.on_corrupt, self._decode_size())

    def _decode_size(self) -> int:
        """The smallest shorter side a decoded image needs: enough for the eval resize and
        for the smallest random crop to still cover img_size."""
        a, side = self.cfg.augment, max(self.img_size)
        need = side / a.crop_pct
        if a.random_resized_crop:
            need = max(need, side / math.sqrt(a.scale_min))
        return math.ceil(need)

    @property
    def origin(self) -> str:
        """Where the data comes from, as errors name it."""
        return self._build().origin

    def batches_per_epoch(self, world_size: int) -> int:
        """Training batches per epoch on each of `world_size` processes."""
        train = self._build().train
        if isinstance(train, (ParquetStream, packs.PackedSplit)):  # whole batches, evenly
            return train.batches_per_rank(world_size, self.cfg.batch_size)
        return math.ceil(len(train) / world_size) // self.cfg.batch_size

    def check_batch_size(self, world_size: int) -> None:
        """One whole batch per device at least (the last partial batch is dropped; a stream
        gives each rank an equal share of its rows)."""
        train = self._build().train
        if isinstance(train, (ParquetStream, packs.PackedSplit)):  # whole batches every rank
            n = train.num_rows if isinstance(train, ParquetStream) else len(train)
            per_device = n // world_size
        else:
            n = len(train)
            per_device = math.ceil(n / world_size)
        if per_device < self.cfg.batch_size:
            raise DataError(
                f"data.batch_size={self.cfg.batch_size} is larger than the "
                f"{per_device} train examples per device ({n} on {world_size} "
                "devices); lower data.batch_size"
            )

    @property
    def num_classes(self) -> int:
        return len(self._build().class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self._build().class_names)

    def _split(self, split: str) -> Dataset:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: use one of {', '.join(SPLITS)}")
        return getattr(self._build(), split)

    def split_dataset(self, split: str, augment: bool = False) -> Dataset:
        """Map-style (image, label) of a split with the train augmentation or the eval
        transform (few-shot linear evaluation). Items of corrupt skipped images are None."""
        ds = self._map_style(split)
        return Transformed(ds, self._transform(train=augment))

    def raw_split(self, split: str) -> Dataset:
        """Map-style (PIL image, label) of a split, untransformed (pixel baselines)."""
        return self._map_style(split)

    def split_labels(self, split: str) -> torch.Tensor:
        """int64 labels of a map-style split, without decoding any image."""
        return torch.as_tensor(self._map_style(split).labels, dtype=torch.int64)

    def _map_style(self, split: str) -> Dataset:
        ds = self._split(split)
        if isinstance(ds, IterableDataset):
            raise DataError(
                f"the {split} split of {self._build().origin} is streamed (data.streaming=true), "
                "so it has no random access; use a non-streaming split for few-shot evaluation"
            )
        if self.cfg.decode == "gpu":  # PIL images, as with decode=cpu
            return gpu_decode.Decoded(ds, self.cfg.on_corrupt, self._decode_size())
        return ds

    def _transform(self, train: bool):
        return build_transforms(self.cfg.augment, self.img_size, self.mean, self.std, train)

    def _loader_transform(self, train: bool):
        """The loaders' per-sample transform; with data.decode=gpu it only draws the random
        choices, and `on_after_batch_transfer` makes the pixels on the device."""
        if self.cfg.decode == "gpu":
            return gpu_decode.DeviceTransform(self._transform(train), train)
        return self._transform(train)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """data.decode=gpu: decode, crop, flip and normalise the batch on its device (before
        the module sees it, so MixUp / CutMix still come after)."""
        if isinstance(batch, gpu_decode.PendingBatch):
            return self.device_stage(batch)
        return batch

    @property
    def device_stage(self) -> gpu_decode.DeviceStage:
        if self._device_stage is None:
            pipelines = (self._transform(train=True), self._transform(train=False))
            args = (self.img_size, self.mean, self.std, self.cfg.on_corrupt)
            self._device_stage = gpu_decode.DeviceStage(*pipelines, *args)
        return self._device_stage

    # --- loaders ---------------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader_kwargs(self) -> dict[str, Any]:
        t = self.trainer
        cuda = t is not None and t.strategy.root_device.type == "cuda"
        gpu_decoding = self.cfg.decode == "gpu"
        return dict(
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
            pin_memory=cuda,
            collate_fn=gpu_decode.PendingCollate() if gpu_decoding else Collate(self.img_size),
            worker_init_fn=_init_worker,
            # the loader's worker seeds come from its own generator, not the global RNG: a
            # resumed run then draws the same dropout masks as an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        ds = self._split("train")
        rank, world = self._rank()
        if self._subset_note and rank == 0:  # when the fit starts: the run's train.log has it
            log.info("%s", self._subset_note)
            self._subset_note = None
        kw = self._loader_kwargs()
        transform = self._loader_transform(train=True)
        if isinstance(ds, packs.PackedSplit):
            self.check_batch_size(world)
            nodes = getattr(self.trainer, "num_nodes", 1)
            apply = partial(_apply, transform)
            return packs.train_loader(ds, rank, world, nodes, self.seed, apply, **kw)
        if isinstance(ds, ParquetStream):
            self.check_batch_size(world)
            stream = ds.configure(rank, world, self.seed)
            stream.start_at(0, 0, self.cfg.batch_size)
            if rank == 0:
                log.info("%s", stream.describe(max(1, self.cfg.num_workers)))
            # the stream makes whole batches itself (start_at tells it batch_size), the same
            # number on every rank; workers keep their copy of the dataset: persistent ones
            # would miss set_epoch
            train = TrainStream(stream, transform)
            return TrainLoader(train, world, drop_last=True, persistent_workers=False, **kw)
        sampler = EpochSampler(len(ds), self.seed, rank, world)
        self.check_batch_size(world)
        return TrainLoader(
            Transformed(ds, transform),
            world,
            sampler=sampler,
            drop_last=True,
            persistent_workers=self.cfg.num_workers > 0,
            **kw,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self._split(split)
        rank, world = self._rank()
        transform = self._loader_transform(train=False)
        if isinstance(ds, ParquetStream):
            data: Dataset = TransformedStream(ds.configure(rank, world, None), transform)
            return Loader(data, **self._loader_kwargs())
        if len(ds) == 0:
            fix = (
                f"set data.shapes.num_{split} > 0"
                if self.cfg.source == "shapes"
                else f"add data or raise data.{split}_fraction"
            )
            raise DataError(f"{self._build().origin}: the {split} split is empty; {fix}")
        data = Transformed(ds, transform, indices=range(rank, len(ds), world))  # no padding
        persistent = self.cfg.num_workers > 0
        return Loader(data, shuffle=False, persistent_workers=persistent, **self._loader_kwargs())


def _init_worker(worker_id: int) -> None:
    """A loader worker ignores Ctrl-C: the terminal sends it to the whole process group, and
    the main process stops at the end of the batch (vitexp.training.callbacks.PreemptionCheckpoint),
    which needs its workers alive until then. Lightning's worker seeding is kept."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get("PL_SEED_WORKERS") == "1":
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


# --- datasets with transforms --------------------------------------------------------------
def _apply(transform, item: tuple[Any, int], seed: int | None):
    img, label = item
    if img is None:  # corrupt and skipped: Collate drops it
        return None
    if seed is None or not getattr(transform, "is_random", True):
        return transform(img), label
    # the transforms draw from the CPU generator: seed it alone (torch.manual_seed would also
    # reseed CUDA), and leave it as it was afterwards
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(img), label


class Transformed(Dataset):
    """A map-style split with a transform. A key is an index, or (index, seed) from
    EpochSampler: then the random transform is seeded, whatever worker runs it."""

    def __init__(self, ds: Dataset, transform, indices: Sequence[int] | None = None) -> None:
        self.ds, self.transform = ds, transform
        self.indices = indices if indices is not None else range(len(ds))
        self.labels = np.asarray(ds.labels)[np.asarray(self.indices, dtype=np.int64)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        return _apply(self.transform, self.ds[self.indices[index]], seed)


class TransformedStream(IterableDataset):
    """A ParquetStream with a transform seeded per sample (evaluation: no length, so that
    Lightning reads every worker's last, partial batch)."""

    def __init__(self, stream: ParquetStream, transform) -> None:
        self.stream, self.transform = stream, transform

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def start_at(self, epoch: int, batches: int, batch_size: int) -> None:
        self.stream.start_at(epoch, batches, batch_size)

    def __iter__(self):
        for img, label, seed in self.stream:
            yield _apply(self.transform, (img, label), seed)


class TrainStream(TransformedStream):
    """The training stream, whose length (whole batches per rank) the loader reports."""

    def __len__(self) -> int:
        return len(self.stream)


class Collate:
    """default_collate without the None items of skipped corrupt images; a batch with none
    left is (0, 3, H, W) images and (0,) labels."""

    def __init__(self, img_size: tuple[int, int]) -> None:
        self.img_size = img_size

    def __call__(self, batch: list):
        batch = [b for b in batch if b is not None]
        if not batch:
            return torch.zeros(0, 3, *self.img_size), torch.zeros(0, dtype=torch.int64)
        return default_collate(batch)


# --- sampling and loaders --------------------------------------------------------------
class EpochSampler(Sampler):
    """Yields (index, sample_seed) for this rank: a permutation that is a pure function of
    (seed, epoch), padded to a multiple of world_size and taken rank::world_size (as
    DistributedSampler), with a per-index seed for the augmentation. Lightning calls
    set_epoch before each epoch (fit_loop.on_advance_start -> _set_sampler_epoch)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch = 0
        self._start: tuple[int, int] | None = None  # (epoch, samples already consumed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, epoch: int, batches: int, batch_size: int) -> None:
        """Skip the first batches of `epoch` (applies once, and only to that epoch)."""
        self._start = (epoch, batches * batch_size)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed % 2**64, self.epoch])
        perm = rng.permutation(self.n)
        seeds = rng.integers(0, 2**62, size=self.n)  # seeds[i]: sample i's augmentation seed
        total = len(self) * self.world_size
        perm = np.resize(perm, total)  # pads by wrapping around, as DistributedSampler
        mine = perm[self.rank :: self.world_size]
        start = 0
        if self._start is not None and self._start[0] == self.epoch:
            start = min(self._start[1], len(mine))
        self._start = None
        for i in mine[start:].tolist():
            yield i, int(seeds[i])


class Loader(DataLoader):
    """A DataLoader whose iterator starts on the first `next()`: Lightning calls `iter()`
    before `set_epoch` when a fit (re)starts, and a worker pool would otherwise fetch the
    previous epoch's order. A DataError raised in a worker comes back as its one line."""

    def __iter__(self):
        return _LazyIterator(self)

    def _start(self):
        return super().__iter__()

    def _on_batch(self) -> None:
        pass


class _LazyIterator:
    def __init__(self, loader: Loader) -> None:
        self.loader, self.it = loader, None

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __next__(self):
        try:
            if self.it is None:
                self.it = self.loader._start()
            batch = next(self.it)
        except DataError as err:  # from a worker: "Caught DataError ... Traceback ... <msg>"
            last = str(err).strip().splitlines()[-1]
            raise DataError(last.removeprefix("vitexp.errors.DataError: ")) from None
        self.loader._on_batch()
        return batch


class TrainLoader(Loader):
    """The train loader. `state_dict` records (epoch, batches consumed), which Lightning
    saves with each checkpoint and gives back (`load_state_dict`) before the resumed epoch
    starts; that epoch then skips the consumed batches without loading them.

    The epoch comes from an EpochSampler or, for a stream, from the dataset; Lightning only
    calls `sampler.set_epoch`, so a stream's loader gets a sampler that relays it.
    """

    def __init__(self, dataset: Dataset, world_size: int = 1, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.world_size = world_size  # a resume with another device count restarts the epoch
        if isinstance(dataset, IterableDataset):  # DataLoader takes no sampler for these
            object.__setattr__(self, "sampler", _EpochRelay(dataset))
        self._driver = self.sampler  # has .epoch, set_epoch, start_at(epoch, batches, batch_size)
        self._consumed = 0
        self._resume: tuple[int, int] | None = None

    def _start(self):
        epoch = self._driver.epoch
        resuming = self._resume is not None and self._resume[0] == epoch
        self._consumed = self._resume[1] if resuming else 0
        self._driver.start_at(epoch, self._consumed, self.batch_size)
        self._resume = None
        return super()._start()

    def _on_batch(self) -> None:
        self._consumed += 1

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._driver.epoch,
            "batches": self._consumed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
        }

    def _layout(self, state: dict[str, int]) -> tuple:
        """What the batches of an epoch depend on besides (seed, epoch): the batch size and
        device count, and for a stream (its readers are the workers) the worker count."""
        stream = isinstance(self.dataset, IterableDataset)
        workers = state.get("num_workers", self.num_workers) if stream else None
        return state.get("batch_size"), state.get("world_size"), workers

    def load_state_dict(self, state: dict[str, int]) -> None:
        same = self._layout(state) == self._layout(self.state_dict())
        if not same:
            warnings.warn(
                "the checkpoint's train loader had another batch size, device count or (for "
                "streamed data) loader worker count; the resumed epoch starts again from its "
                "first batch",
                stacklevel=2,
            )
        self._driver.set_epoch(state["epoch"])
        self._resume = (state["epoch"], state["batches"]) if same else None


class _EpochRelay:
    """Stands in for a stream loader's sampler so that Lightning's set_epoch reaches the
    dataset."""

    def __init__(self, dataset: IterableDataset) -> None:
        self.dataset = dataset

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def start_at(self, epoch: int, batches: int, batch_size: int) -> None:
        self.dataset.start_at(epoch, batches, batch_size)
