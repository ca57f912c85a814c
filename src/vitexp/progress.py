"""What a run shows while it trains: the progress bar (without a host-device sync at every
step) and a line per validation."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

log = logging.getLogger("vitexp")


class ProgressBar(RichProgressBar):
    """Lightning's rich bar, reading the logged training metrics every `every_n_steps` steps.

    Reading a metric copies it from the GPU, which waits for the step to finish; done at
    every step, the CPU can never queue the next step ahead. The bar still moves every step;
    its loss/accuracy figures refresh every `every_n_steps` (and at every validation).
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        super().__init__(leave=True)
        self.every_n_steps = max(1, int(every_n_steps))
        self._metrics: dict = {}
        self._read_at: int | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        step = trainer.global_step
        stale = self._read_at is None or (step != self._read_at and step % self.every_n_steps == 0)
        if not trainer.training or stale:
            self._metrics = super().get_metrics(trainer, pl_module)
            self._read_at = step
        return self._metrics


class ValidationLog(L.Callback):
    """One line per validation in the console and train.log: step, epoch and the metrics
    (train loss, val loss/accuracy, few-shot accuracy)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        shown = []
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.startswith(("val/", "train/loss", "fewshot/")):
                shown.append(f"{key} {float(value):.4g}")
        step, epoch = trainer.global_step, trainer.current_epoch
        log.info("step %d (epoch %d): %s", step, epoch, ", ".join(shown))
