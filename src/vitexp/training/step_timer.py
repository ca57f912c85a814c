"""The training step alone, timed: `vitexp.train`'s module, Lightning loop and callbacks on
one in-memory batch, so that neither the loader nor the disk is in the number. Shared by the
benchmark (`vitexp.training.throughput`) and the loader check (`vitexp.training.bottleneck`)."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary
from torch.utils.data import DataLoader, Dataset

from vitexp.models import build_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(c: Any, num_classes: int, warmup: int, steps: int) -> list[float]:
    """Seconds of each training step of a composed and validated `vitexp.train` config `c`
    (its model, optimizer, trainer: precision, compile, callbacks; MixUp / CutMix when it
    has them) on one in-memory batch of data.batch_size images, so that only the step is
    timed; c.trainer.max_steps must be warmup + steps."""
    from vitexp.data.transforms import BatchMix
    from vitexp.training.module import ViTModule
    from vitexp.training.trainer import build_trainer, speed_switches

    net = build_model(c.model, num_classes)
    mix = BatchMix.from_config(c.data.augment, num_classes)
    compiled = speed_switches(c.trainer)[1]
    module = ViTModule(net, c.optim, c.schedule, c.loss, compile=compiled, batch_mix=mix)
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as run_dir, quiet_lightning():
        trainer = build_trainer(c, Path(run_dir))  # says the devices, tips, SLURM hints
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelSummary)]
        trainer.callbacks.append(timer)
        size = c.model.img_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        same = SameBatch(c.data.batch_size, size, num_classes, warmup + steps)
        trainer.fit(module, train_dataloaders=DataLoader(same, batch_size=None))
    return timer.times


class SameBatch(Dataset):
    """`n` copies of one random batch: the loader costs nothing, only the step is timed."""

    def __init__(self, batch: int, img_size: tuple[int, int], num_classes: int, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, *img_size, generator=g)
        self.labels = torch.randint(0, num_classes, (batch,), generator=g)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels


class StepTimer(L.Callback):
    """Wall time of each training batch after `skip` warm-up batches."""

    def __init__(self, skip: int) -> None:
        self.skip, self.times, self._start = skip, [], 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        synchronize(module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        synchronize(module.device)
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._start)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]  # each sets INFO for itself
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
