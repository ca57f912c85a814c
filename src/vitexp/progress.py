"""The console progress bar, without a host-device sync at every step."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


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
