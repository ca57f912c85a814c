"""`python -m vitexp.train [+experiment=NAME] [key=value ...]`: pretrain or fine-tune a ViT.

    validate config -> pick the run dir -> data + model (+ pretrained weights) -> Lightning
    fit -> test on the held-out split -> results.json

A run writes to its directory: config.yaml (resolved), checkpoints/ (last.ckpt, best-*.ckpt),
logs/ (the logger's files), train.log, results.json. `ckpt_path=last` continues the newest
run of the same name in its own directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vitexp.callbacks import (
    DDPWorkerWatch,
    LastCheckpoint,
    PreemptionCheckpoint,
    SignalDeadline,
    StaleBestCleanup,
    requeue_count,
    slurm_job_id,
)
from vitexp.checkpoint import (
    AtomicCheckpointIO,
    check_resumable,
    checkpoint_exists,
    load_pretrained,
    read_checkpoint,
    remove_path,
    replace_dir,
    resolve_pretrained,
)
from vitexp.cli import one_line, run_cli, single_run_errors, write_atomic
from vitexp.config import LoggerConfig, TrainConfig, TrainerConfig, register_configs, validate
from vitexp.errors import CheckpointError, ConfigError, Interrupted, NotApplicableCell
from vitexp.models import VisionTransformer
from vitexp.progress import ProgressBar, ValidationLog

log = logging.getLogger("vitexp")
_IMPORTED_AT = time.time() - 1.0  # mtime granularity: a directory Hydra makes is newer
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def resolve_run_dir(c: TrainConfig, hydra_dir: Path) -> tuple[Path, Path | None]:
    """(directory this run writes to, checkpoint to resume from or None).

    A fresh run refuses a directory that already holds checkpoints or results, so that
    nothing is overwritten; a resumed run continues in the directory of its checkpoint.
    """
    last = hydra_dir / "checkpoints" / "last.ckpt"
    if c.ckpt_path is None and requeue_count() > 0 and checkpoint_exists(last):
        log.info("requeued SLURM job: resuming from %s", last)
        return hydra_dir, last
    if c.ckpt_path == "last":
        own = hydra_dir / "checkpoints" / "last.ckpt"
        found = (
            [own]
            if checkpoint_exists(own)
            else sorted(
                hydra_dir.parent.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
            )
        )
        if not found:
            raise ConfigError(
                f"ckpt_path=last: no checkpoints/last.ckpt in {hydra_dir} or in the runs beside "
                f"it under {hydra_dir.parent}; nothing to resume (drop ckpt_path to start fresh)"
            )
        return found[-1].parent.parent, found[-1]
    if c.ckpt_path:
        ckpt = Path(c.ckpt_path)
        if not checkpoint_exists(ckpt):
            raise CheckpointError(f"ckpt_path={ckpt} does not exist")
        return (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else hydra_dir), ckpt
    existing = [
        p.name
        for p in [hydra_dir / "results.json", *hydra_dir.glob("checkpoints/*.ckpt")]
        if p.exists()
    ]
    if existing and rank_zero_only.rank == 0:
        raise ConfigError(
            f"{hydra_dir} already holds a run ({', '.join(existing)}); resume it with "
            "ckpt_path=last, or start a new run elsewhere (name=... or hydra.run.dir=...)"
        )
    return hydra_dir, None


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
        from vitexp.models.vit import Block

        # activation checkpointing is the model's own switch (model.grad_checkpointing):
        # the same code path with or without FSDP, and tested to give the same gradients
        # use_orig_params: the optimizer sees each parameter by name (weight decay on
        # matrices only), not one flat tensor per unit
        return ShardedStrategy(
            auto_wrap_policy={Block},
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


def build_trainer(c: TrainConfig, run_dir: Path, evaluator=None) -> L.Trainer:
    """The Lightning Trainer of a run; `evaluator` adds few-shot evaluation at validation."""
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
    if evaluator is not None:
        from vitexp.fewshot import FewShotCallback

        callbacks.append(FewShotCallback(evaluator))
    if c.stage == "pretrain" and c.figures:
        from vitexp.visualize import FiguresCallback

        callbacks.append(FiguresCallback(run_dir / "figures", c.model.mean, c.model.std))
    callbacks.append(ValidationLog())
    if t.progress_bar:
        callbacks.append(ProgressBar(t.log_every_n_steps))
    strategy = build_strategy(t)
    # under SLURM, requeueing is submitit's or vitexp's (see vitexp.callbacks), not Lightning's
    slurm = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=speed_switches(t)[0],
        max_steps=t.max_steps,
        max_epochs=t.max_epochs if t.max_epochs else (-1 if t.max_steps > 0 else None),
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val or None,
        gradient_clip_algorithm="norm",
        deterministic=t.deterministic,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        limit_test_batches=t.limit_test_batches,
        callbacks=callbacks,
        logger=build_logger(c.logger, run_dir),
        default_root_dir=run_dir,
        enable_progress_bar=t.progress_bar,
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


def build_net(c: TrainConfig, num_classes: int) -> VisionTransformer:
    return VisionTransformer(num_classes=num_classes, **c.model.model_kwargs())


RUN_LOG = "vitexp-train-log"  # the name of the train.log handler of the run in progress


def _log_to_file(run_dir: Path) -> None:
    """train.log: the run's console lines (vitexp's and Lightning's messages, the progress
    at each validation, the result, any error), on rank 0."""
    if rank_zero_only.rank != 0:
        return
    _stop_logging_to_file()
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    handler.set_name(RUN_LOG)
    for name in ("vitexp", "lightning.pytorch"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)


def _stop_logging_to_file(error: str | None = None) -> None:
    """Close train.log, with the error line that ended the run (only there: the console
    gets it from the command line's handler)."""
    # found through the logger, not kept in a global: submitit pickles this module's
    # functions with their globals when it requeues a job, and a handler holds a lock
    handler = next((h for h in logging.getLogger("vitexp").handlers if h.name == RUN_LOG), None)
    if handler is None:
        return
    if error:
        handler.handle(logging.makeLogRecord({"msg": f"error: {error}", "levelname": "ERROR"}))
    for name in ("vitexp", "lightning.pytorch"):
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def remove_new_empty_dirs(path: Path, since: float | None = None) -> None:
    """Remove `path` and its parents while they are empty and were made by this process
    (after `since`, default: when vitexp.train was imported): Hydra makes the run
    directory before any check, and a run that stops on a check leaves nothing behind."""
    since = _IMPORTED_AT if since is None else since
    path = Path(path).absolute()
    stop = Path.cwd().absolute()
    while path != stop and path.is_dir() and path.stat().st_mtime >= since:
        try:
            path.rmdir()  # only when empty
        except OSError:
            return
        path = path.parent


def describe_run(
    c: TrainConfig, trainer: L.Trainer, num_classes: int, run_dir: Path, resume: Path | None
) -> str:
    """The config summary line at the top of a run's console output and train.log."""
    t, m = c.trainer, c.model
    budget = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.max_epochs} epochs"
    precision, compiled = speed_switches(t)
    batch = c.data.batch_size * trainer.world_size * trainer.accumulate_grad_batches
    return (
        f"{c.stage} {m.name} ({m.pos_embed.kind}/{m.pos_embed.placement}, {m.pool}) on "
        f"{c.data.name} ({num_classes} classes): {budget}, global batch {batch}, "
        f"{c.optim.name} lr {c.optim.lr:g}, {precision}{', compiled' if compiled else ''}, "
        f"{trainer.world_size} process(es) -> {run_dir}"
        + (f" (resuming {resume})" if resume else "")
    )


def check_val_interval(c: TrainConfig, batches_per_epoch: int | None) -> None:
    """Lightning refuses a validation interval longer than an epoch (when it counts within
    epochs); say so before the run starts, with the two ways out."""
    t = c.trainer
    v = t.val_check_interval
    if (
        isinstance(v, int)
        and not isinstance(v, bool)
        and t.check_val_every_n_epoch is not None
        and batches_per_epoch is not None
        and t.limit_train_batches is None
        and v > batches_per_epoch
    ):
        raise ConfigError(
            f"trainer.val_check_interval={v} is more than the {batches_per_epoch} training "
            "batches of an epoch; lower it, or set trainer.check_val_every_n_epoch=null to "
            "count the interval in steps across epochs"
        )


def _devices(t: TrainerConfig) -> int:
    """Processes the run will have (for checks made before Lightning starts)."""
    per_node = t.devices if type(t.devices) is int and t.devices > 0 else 1
    return per_node * t.num_nodes


def run(cfg: DictConfig, hydra_dir: Path | None = None) -> dict[str, Any]:
    """Validate, train, test; returns what results.json holds. Every check (config, data,
    device, run directory, checkpoints) runs before the run directory gets any file."""
    start = time.time()
    c = validate(cfg)
    from vitexp.data import ImageDataModule  # after validation: a bad config fails fast
    from vitexp.module import NO_SCHEDULE_END, ViTModule

    hydra_dir = Path(hydra_dir or HydraConfig.get().runtime.output_dir)
    if requeue_count() > 0 and (hydra_dir / "results.json").is_file():
        log.info("requeued SLURM job had finished: %s/results.json", hydra_dir)
        return json.loads((hydra_dir / "results.json").read_text())
    data = ImageDataModule(
        c.data, c.model.model_kwargs()["img_size"], c.model.mean, c.model.std, c.seed
    )
    data.setup("fit")  # missing or mismatched data is named before anything else
    num_classes = data.num_classes
    data.check_batch_size(_devices(c.trainer))
    batches = data.batches_per_epoch(_devices(c.trainer))
    if batches is None and c.trainer.max_steps < 1:
        raise ConfigError(NO_SCHEDULE_END)
    check_val_interval(c, batches)
    check_device(c.trainer)
    run_dir, resume = resolve_run_dir(c, hydra_dir)
    L.seed_everything(c.seed, workers=True, verbose=False)
    net = build_net(c, num_classes)
    resumed_step = None
    if resume is not None:  # a broken, unsafe or other-model checkpoint stops here, clearly
        saved = read_checkpoint(resume, "ckpt_path", weights=False)  # sharded: no weights
        if "vitexp" in saved:
            check_resumable(saved["vitexp"]["model_config"], net, resume)
        resumed_step = int(saved.get("global_step", 0))
    pretrained, pretrained_meta = None, None
    if c.stage == "finetune":
        pretrained = resolve_pretrained(c.pretrained)
        pretrained_meta = load_pretrained(pretrained, net)
    meta = {
        "stage": c.stage,
        "data": c.data.name,
        "mean": list(c.model.mean),
        "std": list(c.model.std),
        "model_name": c.model.name,
    }
    compile_net = speed_switches(c.trainer)[1]
    module = ViTModule(net, c.optim, c.schedule, c.loss, meta, compile=compile_net)
    evaluator = None
    if c.stage == "pretrain" and c.fewshot.enabled:
        from vitexp.fewshot import FewShotEvaluator

        evaluator = FewShotEvaluator(c.fewshot, net.img_size, c.model.mean, c.model.std)
    trainer = build_trainer(c, run_dir, evaluator)

    # --- every check passed: now the run directory is written
    if run_dir != hydra_dir:
        remove_new_empty_dirs(hydra_dir)  # the fresh directory Hydra made for this attempt
    run_dir.mkdir(parents=True, exist_ok=True)
    _log_to_file(run_dir)
    log.info("%s", describe_run(c, trainer, num_classes, run_dir, resume))
    if c.data.num_classes is None:
        log.info("data.num_classes=%d, from the data (%s)", num_classes, data.origin)
    if pretrained is not None:
        log.info("fine-tuning from %s at %s", pretrained, net.img_size)
    if trainer.is_global_zero:
        config_file = run_dir / ("config.yaml" if resume is None else "config.resume.yaml")
        write_atomic(config_file, OmegaConf.to_yaml(_without_hydra(cfg), resolve=True))
        if c.logger.name == "wandb" and not (run_dir / "wandb_id.txt").is_file():
            write_atomic(run_dir / "wandb_id.txt", trainer.logger.version)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    except SIGTERMException:
        by_user = _interrupted_by_user(trainer)
        how = "interrupted (Ctrl-C)" if by_user else "stopped by a signal"
        message = (
            f"{how} at step {trainer.global_step}; {run_dir}/checkpoints/last.ckpt holds that "
            "step: resume with ckpt_path=last"
            + ("" if by_user else " (a requeued SLURM job resumes by itself)")
        )
        if slurm_job_id() and not by_user:  # SLURM requeues or cancels: no result for submitit
            _stop_logging_to_file(message)
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(Interrupted.exit_code)
        raise Interrupted(message, exit_code=130 if by_user else Interrupted.exit_code) from None
    except SystemExit:  # Lightning's exit after a second Ctrl-C (KeyboardInterrupt)
        if not _interrupted_by_user(trainer):
            raise
        raise Interrupted(
            "stopped at once by a second Ctrl-C; checkpoints/last.ckpt in "
            f"{run_dir} is the last one saved (whole): resume with ckpt_path=last",
            exit_code=130,
        ) from None
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    fewshot = evaluator.evaluate(net) if evaluator and trainer.is_global_zero else None
    results = {
        "status": "done",
        "stage": c.stage,
        "experiment": _experiment_name(),
        "name": c.name,
        "data": c.data.name,
        "model": c.model.name,
        "pos_embed": {"kind": c.model.pos_embed.kind, "placement": c.model.pos_embed.placement},
        "seed": c.seed,
        "metrics": {k: float(v) for k, v in tested.items()},
        "fewshot": fewshot,
        "fewshot_report": (
            f"{c.fewshot.data.name}/{c.fewshot.report_shot}shot" if fewshot else None
        ),
        "best_val_acc": _best_score(trainer),
        "steps": trainer.global_step,
        "world_size": trainer.world_size,
        "global_batch_size": c.data.batch_size
        * trainer.world_size
        * trainer.accumulate_grad_batches,
        "epochs": trainer.current_epoch,
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "best_checkpoint": trainer.checkpoint_callbacks[0].best_model_path or None,
        "pretrained": str(pretrained) if pretrained else None,
        "pretrained_data": (pretrained_meta or {}).get("data"),
        "resumed_from": str(resume) if resume else None,
        "resumed_at_step": resumed_step,
        "slurm_job_id": slurm_job_id(),
        "slurm_restarts": requeue_count(),
        "wall_time_s": round(time.time() - start, 2),
        "run_dir": str(run_dir),
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
    }
    if trainer.is_global_zero:
        write_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        acc = results["metrics"].get("test/acc")
        log.info(
            "%s on %s: test accuracy %.4f after %d steps (%.0f s) -> %s/results.json",
            c.stage,
            c.data.name,
            acc,
            results["steps"],
            results["wall_time_s"],
            run_dir,
        )
    _stop_logging_to_file()
    return results


def _interrupted_by_user(trainer: L.Trainer) -> bool:
    """Ctrl-C (vitexp.callbacks.PreemptionCheckpoint), not SIGTERM or preemption."""
    return any(isinstance(cb, PreemptionCheckpoint) and cb.interrupted for cb in trainer.callbacks)


def _best_score(trainer: L.Trainer) -> float | None:
    score = trainer.checkpoint_callbacks[0].best_model_score
    return None if score is None else float(score)


def _experiment_name() -> str | None:
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("experiment")
    return None


def _without_hydra(cfg: DictConfig) -> DictConfig:
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return OmegaConf.create(plain)


register_configs()


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_sweep_job(cfg: DictConfig, status: str, reason: str) -> None:
    """In a sweep, leave a record for the report: results.json for an N/A cell (not trained),
    failed.json for a job that failed. Never touches a directory that holds results."""
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    if (job_dir / "results.json").exists():
        return
    record = {
        "status": status,
        "reason": reason,
        "name": cfg.name,
        "seed": cfg.seed,
        "data": cfg.data.name,
        "pos_embed": {"kind": cfg.model.pos_embed.kind, "placement": cfg.model.pos_embed.placement},
        "overrides": list(HydraConfig.get().overrides.task),
    }
    target = "results.json" if status == "n/a" else "failed.json"
    write_atomic(job_dir / target, json.dumps(record, indent=2) + "\n")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@single_run_errors
def _hydra_main(cfg: DictConfig) -> float | None:
    """Hydra's entry: returns the test accuracy for sweepers. In a sweep, the paper's N/A
    cells are recorded and skipped, so a full 4 x 3 grid finishes with exit code 0."""
    try:
        return run(cfg)["metrics"].get("test/acc")
    except NotApplicableCell as err:
        if not _in_multirun():
            remove_new_empty_dirs(Path(HydraConfig.get().runtime.output_dir))
            raise
        log.info("skipping an N/A cell: %s", err)
        record_sweep_job(cfg, "n/a", str(err))
        return None
    except BaseException as err:
        _stop_logging_to_file(one_line(err))
        if _in_multirun() and rank_zero_only.rank == 0 and isinstance(err, Exception):
            record_sweep_job(cfg, "failed", one_line(err))
        elif not _in_multirun():
            remove_new_empty_dirs(Path(HydraConfig.get().runtime.output_dir))
        raise


def main() -> None:
    run_cli(_hydra_main)


if __name__ == "__main__":
    sys.exit(main())
