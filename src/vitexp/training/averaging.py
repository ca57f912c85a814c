"""Polyak / exponential moving average of the weights (`ema.decay`), on Lightning's
`EMAWeightAveraging` callback.

What Lightning's callback already does: the average is a `torch.optim.swa_utils.
AveragedModel` updated after every optimizer step (with gradient accumulation: once per
step); validation runs on the averaged weights (swapped in and back); every checkpoint
holds the average in `state_dict` (so fine-tuning, `vitexp.fewshot` and `vitexp.visualize`
read the averaged weights by default), the trained weights in `current_model_state` and
the average's step count in `averaging_state`, and a resumed run restores all three.

What this subclass adds:
- the optional warmup of the decay (`ema.warmup`: min(decay, (1 + t) / (10 + t)));
- at the end of training the model holds the average (test, few-shot and figures use it)
  and the trained weights are kept (`raw_state`): the final last.ckpt still stores them as
  `current_model_state`, and `vitexp.train` tests them too (`trained_weights`: `test_raw/acc`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from vitexp.config import EMAConfig
from vitexp.training.checkpoint import RAW_WEIGHTS_KEY


def ema_update(decay: float, warmup: bool):
    """`multi_avg_fn` of AveragedModel: avg <- d * avg + (1 - d) * current, for all tensors
    in one foreach op; `n` is how many updates the average has had."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor):
        if not averaged[0].is_floating_point():  # index buffers: nothing to average
            torch._foreach_copy_(averaged, current)
            return
        d = min(decay, (1 + float(n)) / (10 + float(n))) if warmup else decay
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


class WeightAverage(EMAWeightAveraging):
    """`ema.decay` and `ema.warmup` as a Lightning callback (see the module docstring)."""

    def __init__(self, cfg: EMAConfig) -> None:
        super().__init__(decay=cfg.decay)
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = ema_update(cfg.decay, cfg.warmup)
        self.cfg = cfg
        self.raw_state: dict[str, torch.Tensor] | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.raw_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self.raw_state is not None and RAW_WEIGHTS_KEY in checkpoint:
            # after training the module holds the average: keep the trained weights
            checkpoint[RAW_WEIGHTS_KEY] = self.raw_state

    @contextlib.contextmanager
    def trained_weights(self, pl_module: L.LightningModule):
        """After training: the model holds the trained (not averaged) weights inside the
        block, the average again after it."""
        if self.raw_state is None:
            raise RuntimeError("trained_weights() is for after training: none kept")
        averaged = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(self.raw_state)
        try:
            yield
        finally:
            pl_module.load_state_dict(averaged)

    def describe(self) -> str:
        return f"EMA {self.cfg.decay:g}" + (" (warmup)" if self.cfg.warmup else "")
