"""The Lightning Trainer of a run: callbacks, logger, strategy (DDP, FSDP), precision.

`trainer.*` keys that are Trainer arguments pass through by name
(`TrainerConfig.lightning_args`); vitexp's own switches (compile, checkpoint interval,
progress bar, timeouts, FSDP state dict) are applied here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import FSDPStrategy

from vitexp.config import LoggerConfig, TrainConfig, TrainerConfig
from vitexp.errors import ConfigError
from vitexp.training.callbacks import (
    DDPWorkerWatch,
    LastCheckpoint,
    PreemptionCheckpoint,
    SignalDeadline,
    StaleBestCleanup,
)
from vitexp.training.checkpoint import AtomicCheckpointIO, read_checkpoint, remove_path, replace_dir
from vitexp.training.progress import ProgressBar, ValidationLog


def build_logger(cfg: LoggerConfig, run_dir: Path):
    """CSV / TensorBoard / wandb; each resumed attempt gets a new version dir (CSV/TB) or
    continues the same wandb run (its id is kept in the run dir)."""
    if cfg.name == "csv":
        return L.pytorch.loggers.CSVLogger(run_dir, name="logs")
    if cfg.name == "tensorboard":
        return L.pytorch.loggers.TensorBoardLogger(run_dir, name="logs")
    # the same id for every attempt in this run directory (kept in wandb_id.txt, which the
    # run writes once its checks have passed): a resumed run continues the wandb run
    id_file = run_dir / "wandb_id.txt"
    run_id = (
        id_file.read_text().strip()
        if id_file.is_file()
        else hashlib.blake2b(str(run_dir.resolve()).encode(), digest_size=4).hexdigest()
    )
    if cfg.offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    return L.pytorch.loggers.WandbLogger(
        project=cfg.project,
        entity=cfg.entity,
        save_dir=str(run_dir),
        offline=cfg.offline,
        id=run_id,
        resume="allow",
        name=run_dir.name,
    )


def speed_switches(t: TrainerConfig) -> tuple[str, bool]:
    """(precision, compile) with `auto` / null resolved for the device: on a CUDA GPU,
    bf16 autocast (fp16 where bf16 is missing) and torch.compile, trainer=gpu's switches;
    elsewhere fp32 and eager."""
    gpu = t.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    precision = t.precision
    if precision == "auto" and not gpu:
        precision = "32-true"
    elif precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return precision, gpu if t.compile is None else t.compile


def check_device(t: TrainerConfig) -> None:
    """A GPU preset on a machine without one: say how to run it here, in one line."""
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={t.accelerator} but this machine has no CUDA GPU; add "
            "trainer=cpu to run it here on the CPU (fp32), or run it on a GPU machine"
        )


def build_strategy(t: TrainerConfig) -> Any:
    """`trainer.strategy` for Lightning: ddp and fsdp with vitexp's settings, else as named."""
    from datetime import timedelta

    timeout = timedelta(seconds=t.ddp_timeout_s)
    if t.strategy == "ddp":
        return L.pytorch.strategies.DDPStrategy(timeout=timeout)
    if t.strategy == "fsdp":
        from vitexp.models.resnet import PreActBottleneck
        from vitexp.models.vit import Block

        # activation checkpointing is the model's own switch (model.grad_checkpointing):
        # the same code path with or without FSDP, and tested to give the same gradients
        # use_orig_params: the optimizer sees each parameter by name (weight decay on
        # matrices only), not one flat tensor per unit
        return ShardedStrategy(
            auto_wrap_policy={Block, PreActBottleneck},  # one unit per block, any family
            state_dict_type=t.fsdp_state_dict,
            timeout=timeout,
            use_orig_params=True,
        )
    return t.strategy


class ShardedStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (one FSDP unit per encoder block), with:

    - sharded checkpoints written to a hidden directory and swapped in, as atomic as
      `AtomicCheckpointIO` (which writes the `full` ones: Lightning hands those to it);
    - every checkpoint checked by `read_checkpoint` (weights_only) before Lightning's own
      loaders, which unpickle without that check, read it;
    - the wrapped model kept from fit to test: Lightning would re-wrap only the blocks and
      leave the root's parameters as flat shards (Lightning issue #19015);
    - CPU (gloo) support, for tests: torch's FSDP needs device_id=cpu, which Lightning does
      not pass (a subclass also skips Lightning's "FSDP needs a GPU" check).
    """

    _wrapped: Any = None

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self._wrapped is not None and self._wrapped.module is model:
            return self._wrapped
        if self.root_device.type == "cpu":
            model = FullyShardedDataParallel(
                model,
                device_id=self.root_device,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied: Lightning would warn
        self._wrapped = super()._setup_model(model)
        return self._wrapped

    def optimizer_state(self, optimizer) -> dict:
        """On CPU, gather the `full` optimizer state without torch's CPU offload: for a CPU
        tensor its `.cpu()` copies nothing, so every state of a parameter (AdamW's two
        moments) would end up a view of one reused buffer."""
        if self._state_dict_type != "full" or self.root_device.type != "cpu":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            OptimStateKeyType,
            StateDictType,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
        full = FullStateDictConfig(rank0_only=True)
        optim = FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, full, optim):
            state = FSDP.optim_state_dict(self.model, optimizer)
        if self.global_rank == 0:  # keyed by parameter index, as Lightning saves it
            state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero:
            remove_path(partial)  # a crashed save's leftovers
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()  # every rank's shard is on disk
        if self.is_global_zero:
            replace_dir(partial, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        read_checkpoint(checkpoint_path, "ckpt_path", weights=False)
        return super().load_checkpoint(checkpoint_path, weights_only)


def weight_average(trainer: L.Trainer):
    """The run's `vitexp.training.averaging.WeightAverage` callback, or None (no `ema.decay`)."""
    from vitexp.training.averaging import WeightAverage

    return next((cb for cb in trainer.callbacks if isinstance(cb, WeightAverage)), None)


def build_trainer(
    c: TrainConfig,
    run_dir: Path,
    evaluation: Sequence[L.Callback] = (),
    end_of_fit: Sequence[L.Callback] = (),
) -> L.Trainer:
    """The Lightning Trainer of a run. `evaluation`: callbacks that score the model at every
    validation (the few-shot probe); `end_of_fit`: callbacks that use the final model when
    training ends (the paper's figures). `vitexp.train` builds both from vitexp.analysis
    (training never imports it); the Trainer places them around the weight average."""
    t = c.trainer
    checkpoints = run_dir / "checkpoints"
    callbacks = [
        # best validation accuracy; last.ckpt at every validation and every n steps
        ModelCheckpoint(
            checkpoints,
            "best-{step}",
            monitor="val/acc",
            mode="max",
            save_top_k=1,
            enable_version_counter=False,
        ),
        LastCheckpoint(checkpoints / "last.ckpt", t.checkpoint_every_n_steps),
        LearningRateMonitor(logging_interval="step"),
        PreemptionCheckpoint(checkpoints / "last.ckpt"),
        StaleBestCleanup(checkpoints),
        DDPWorkerWatch(checkpoints / "last.ckpt"),
        SignalDeadline(t.ddp_timeout_s),
    ]
    callbacks.extend(evaluation)
    if c.ema.decay is not None:
        # after the evaluation callbacks, which score the average before it is swapped out
        # at the end of a validation, and before the end-of-fit ones (the figures, drawn of
        # the average)
        from vitexp.training.averaging import WeightAverage

        callbacks.append(WeightAverage(c.ema))
    callbacks.extend(end_of_fit)
    callbacks.append(ValidationLog())
    if t.progress_bar:
        callbacks.append(ProgressBar(t.log_every_n_steps))
    # under SLURM, requeueing is submitit's or vitexp's (see vitexp.training.callbacks), not
    # Lightning's
    slurm = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
    lightning = t.lightning_args()
    lightning.update(  # the Trainer arguments whose values vitexp resolves
        precision=speed_switches(t)[0],
        strategy=build_strategy(t),
        max_epochs=t.max_epochs if t.max_epochs else (-1 if t.max_steps > 0 else None),
        gradient_clip_val=t.gradient_clip_val or None,
    )
    trainer = L.Trainer(
        **lightning,
        gradient_clip_algorithm="norm",
        callbacks=callbacks,
        logger=build_logger(c.logger, run_dir),
        default_root_dir=run_dir,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,  # the run's first lines say the model and its size
        use_distributed_sampler=False,  # the data module shards by rank itself
        plugins=[AtomicCheckpointIO(), *slurm],
    )
    # keep the global batch whatever the number of devices: accumulate the rest
    per_step = c.data.batch_size * trainer.world_size
    if c.data.global_batch_size:
        if c.data.global_batch_size % per_step:
            raise ConfigError(
                f"data.global_batch_size={c.data.global_batch_size} is not a multiple of "
                f"data.batch_size x devices = {per_step}"
            )
        trainer.accumulate_grad_batches = c.data.global_batch_size // per_step
    return trainer
