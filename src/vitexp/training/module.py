"""ViTModule: the LightningModule around a VisionTransformer (loss, metrics, optimizers).

Pretraining and fine-tuning differ only in their configs (optimizer, schedule, loss) and in
how the network was built (`vitexp.training.checkpoint.load_pretrained`), so one module serves both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from vitexp.config import LossConfig, OptimConfig, ScheduleConfig
from vitexp.errors import ConfigError, Diverged
from vitexp.models import VisionTransformer
from vitexp.models.factory import model_record

CHECKPOINT_FORMAT = 4  # 2: the model's family, config and class count (models.factory);
# 3: the hybrid stem pads "SAME", as the paper's JAX code (models.hybrid);
# 4: the hybrid's projection is stored once, as patch_embed.proj (older: also .embed.proj)
NO_SCHEDULE_END = (
    "trainer.max_steps is not set and the train loader has no length: "
    "set trainer.max_steps to give the schedule its end"
)


def lr_lambda(
    step: int, total_steps: int, warmup_steps: int, name: str, end_lr_ratio: float
) -> float:
    """Learning-rate multiplier: linear warmup, then linear or cosine decay (or constant)."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "warmup_linear":
        decay = 1.0 - progress
    else:  # warmup_cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return end_lr_ratio + (1.0 - end_lr_ratio) * decay


def build_optimizer(groups: list[dict[str, Any]], o: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer with PyTorch's fused kernel (one kernel for all parameters,
    on CPU and CUDA; `optim.fused=false` for the per-parameter loop): same update, less
    time per step."""
    fused = {"fused": o.fused}
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, **fused)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=(o.beta1, o.beta2), **fused)


def sigmoid_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's pretraining loss: independent sigmoids, summed over classes."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()


class ViTModule(L.LightningModule):
    """Trains `net`; every checkpoint also records how to rebuild it (`checkpoint["vitexp"]`).

    Args:
        net: the VisionTransformer (already loaded from a pretrained checkpoint for fine-tuning).
        optim, schedule, loss: the config groups of the same names.
        meta: facts saved with every checkpoint (stage, data name, class names, normalisation).
        compile: run the forward pass through `torch.compile` (the saved weights stay those of
            the plain module, so checkpoints never carry `_orig_mod.` prefixes).
        batch_mix: MixUp / CutMix of each training batch (vitexp.data.transforms.BatchMix);
            the loss then takes its soft targets. Validation and test see plain batches.
    """

    def __init__(
        self,
        net: VisionTransformer,
        optim: OptimConfig,
        schedule: ScheduleConfig,
        loss: LossConfig,
        meta: dict[str, Any] | None = None,
        compile: bool = False,
        batch_mix: Callable | None = None,
    ):
        super().__init__()
        # plain containers only: checkpoints must load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {"optim": asdict(optim), "schedule": asdict(schedule), "loss": asdict(loss)}
        )
        self.net = net
        self.optim_cfg, self.schedule_cfg, self.loss_cfg = optim, schedule, loss
        self.meta = dict(meta or {})
        self._forward = [torch.compile(net) if compile else net]  # a list: not a submodule
        self.batch_mix = batch_mix
        self.test_key = "test"  # the log keys of a test: test/acc, or test_raw/acc (EMA)
        num_classes = net.num_classes
        top5 = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        # weight decay on weight matrices only: decided on the plain model, because under FSDP
        # the optimizer is built after wrapping, when parameters are flat 1-D shards
        skip = net.no_weight_decay()
        self._decayed = {n for n, p in net.named_parameters() if p.ndim >= 2 and n not in skip}
        # layer-wise lr decay: each parameter's depth, from the plain model too (FSDP)
        self._layer_ids = net.layer_ids() if optim.layer_decay is not None else None
        # (step, epoch, loss) of the steps whose loss has not been checked for NaN/inf yet
        self._unchecked_losses: list[tuple[int, int, torch.Tensor]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward[0](images)

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The configured loss of class indices (B,) or soft targets (B, classes), e.g. a
        MixUp batch's; label smoothing applies to either."""
        smoothing = self.loss_cfg.label_smoothing
        if self.loss_cfg.name == "sigmoid":
            if targets.ndim == 1:
                targets = F.one_hot(targets, logits.shape[-1])
            targets = targets.to(logits.dtype) * (1 - smoothing) + smoothing / logits.shape[-1]
            return sigmoid_cross_entropy(logits, targets)
        if targets.ndim > 1:
            targets = targets.to(logits.dtype)
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)

    # --- steps -----------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        images, labels = batch
        targets = labels
        if self.batch_mix is not None:
            images, targets = self.batch_mix(images, labels)
            labels = targets.argmax(-1)  # train/acc: the class with the most weight
        logits = self(images)
        loss = self.loss_fn(logits, targets)
        self._unchecked_losses.append((self.global_step, self.current_epoch, loss.detach()))
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch, stage: str, key: str) -> None:
        images, labels = batch
        logits = self(images)
        acc, top5 = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_top5")
        acc(logits, labels)
        top5(logits, labels)
        log = partial(self.log, on_step=False, on_epoch=True, sync_dist=True)
        log(f"{key}/loss", self.loss_fn(logits, labels))
        log(f"{key}/acc", acc, prog_bar=stage == "val")
        log(f"{key}/acc_top5", top5)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_key)

    # --- divergence ------------------------------------------------------------------------
    def raise_if_diverged(self) -> None:
        """Raise `Diverged` naming the first step whose training loss was NaN or infinite.

        Checking every loss at once would wait for the GPU at every step; the losses are kept
        on the device and checked in one go here: every `log_every_n_steps`, before any
        checkpoint is written, before validation and at the end of training. A bad step
        therefore never reaches a checkpoint: the last one written is the last good state.
        """
        if not self._unchecked_losses:
            return
        pending, self._unchecked_losses = self._unchecked_losses, []
        finite = torch.isfinite(torch.stack([loss.float() for _, _, loss in pending]))
        if bool(finite.all()):  # the one host-device sync
            return
        step, epoch, loss = pending[int((~finite).nonzero()[0])]
        raise Diverged(
            f"training loss is {loss.item()} at step {step} (epoch {epoch}); lower optim.lr or "
            "check the data. Nothing was saved from this step on: checkpoints/last.ckpt, if "
            "any, is the last good state."
        )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.raise_if_diverged()

    def on_validation_start(self) -> None:
        self.raise_if_diverged()

    def on_train_end(self) -> None:
        self.raise_if_diverged()

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clip the global gradient norm (the paper: 1) for every optimizer and precision.

        Lightning refuses to clip with fused optimizers under mixed precision (they unscale
        fp16 gradients inside `step`), though bf16 has no scaler at all; with fp16 the grads
        are unscaled here first, which fused optimizers accept. Under FSDP the norm must be
        computed over the shards by the wrapped root module.
        """
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # Lightning unscales the other optimizers itself
        root = self.trainer.strategy.model
        if hasattr(root, "clip_grad_norm_"):  # FSDP: a norm over all shards
            norm = root.clip_grad_norm_(gradient_clip_val)
        else:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    # --- optimisation ----------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on weight matrices only: not on norms, biases, position embeddings
        or the class token.

        With `optim.layer_decay` d, one group per (layer id, decayed or not), the layer ids
        being the model's (`net.layer_ids()`: 0 the stem ... L + 1 the head): a group's
        `lr` is optim.lr * `lr_scale`, lr_scale = d ** (L + 1 - id). The schedule (LambdaLR)
        scales each group from its own initial lr, so the ratios hold at every step."""
        o = self.optim_cfg
        decay, no_decay = [], []
        layered: dict[tuple[int, bool], dict[str, Any]] = {}
        top = max(self._layer_ids.values()) if self._layer_ids is not None else 0
        for name, param in self.net.named_parameters():
            if not param.requires_grad:
                continue
            plain = name.replace("_fsdp_wrapped_module.", "")  # FSDP's units (use_orig_params)
            decayed = plain in self._decayed
            if self._layer_ids is None:
                (decay if decayed else no_decay).append(param)
                continue
            layer = self._layer_ids[plain]
            if (layer, decayed) not in layered:
                scale = o.layer_decay ** (top - layer)
                layered[layer, decayed] = {
                    "params": [],
                    "weight_decay": o.weight_decay if decayed else 0.0,
                    "lr": o.lr * scale,
                    "lr_scale": scale,
                    "name": f"layer{layer}" + ("" if decayed else "_no_decay"),  # lr logs
                }
            layered[layer, decayed]["params"].append(param)
        if self._layer_ids is not None:
            return [layered[key] for key in sorted(layered)]
        return [
            {"params": decay, "weight_decay": self.optim_cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        optimizer = build_optimizer(self.parameter_groups(), self.optim_cfg)
        s = self.schedule_cfg
        total_steps = self.trainer.estimated_stepping_batches
        if math.isinf(total_steps) or total_steps < 1:  # -1: a loader without a length
            raise ConfigError(NO_SCHEDULE_END)
        schedule = partial(
            lr_lambda,
            total_steps=int(total_steps),
            warmup_steps=s.warmup_steps,
            name=s.name,
            end_lr_ratio=s.end_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # --- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record how to rebuild the network (`vitexp.training.checkpoint.read_model` reads it) and
        the RNG state, so that a resumed run draws the same dropout masks. A diverged state
        is never saved."""
        self.raise_if_diverged()
        checkpoint["vitexp"] = {"format": CHECKPOINT_FORMAT, **model_record(self.net), **self.meta}
        checkpoint["rng"] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("rng", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
