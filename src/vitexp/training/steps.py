"""The steps of one training run, in the order `vitexp.train.run` takes them:

    prepare_data -> choose_run_dir -> build_network -> build_module -> (build_trainer)
    -> open_run_dir -> (fit) -> test -> results_record -> write_results

Every check (data, device, run directory, checkpoints) comes before `open_run_dir`, the
first step that writes into the run directory (a stop by signal, wherever it lands,
becomes one line in `vitexp.training.stopping.stopped`). The few-shot probe and the figures
are vitexp.analysis's: `vitexp.train` hands them in (as callbacks to `build_trainer`, as
the `probe` of `test`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn

from vitexp.config import TrainConfig
from vitexp.data import ImageDataModule
from vitexp.data.files import write_atomic
from vitexp.data.transforms import BatchMix
from vitexp.errors import ConfigError
from vitexp.models import build_model
from vitexp.training import rundir
from vitexp.training.callbacks import requeue_count, slurm_job_id
from vitexp.training.checkpoint import (
    check_resumable,
    load_pretrained,
    patch_resampling,
    read_checkpoint,
    resolve_pretrained,
)
from vitexp.training.module import ViTModule
from vitexp.training.trainer import check_device, speed_switches, weight_average

log = logging.getLogger("vitexp")


# --- before anything is written --------------------------------------------------------------
def prepare_data(c: TrainConfig) -> ImageDataModule:
    """The data module, its splits read and checked against the run, and the device: missing
    or mismatched data is named before anything else."""
    data = ImageDataModule(c.data, c.model.img_size, c.model.mean, c.model.std, c.seed)
    check_data(c, data)
    check_device(c.trainer)
    return data


def check_data(c: TrainConfig, data: Any) -> None:
    """Read the data's splits and check it against the run: batch size per device, a
    validation interval within an epoch."""
    data.setup("fit")
    t = c.trainer
    devices = (t.devices if type(t.devices) is int and t.devices > 0 else 1) * t.num_nodes
    data.check_batch_size(devices)
    batches = data.batches_per_epoch(devices)
    v = t.val_check_interval
    if (  # Lightning refuses an interval longer than an epoch when it counts within epochs
        isinstance(v, int)
        and not isinstance(v, bool)
        and t.check_val_every_n_epoch is not None
        and t.limit_train_batches is None
        and v > batches
    ):
        raise ConfigError(
            f"trainer.val_check_interval={v} is more than the {batches} training "
            "batches of an epoch; lower it, or set trainer.check_val_every_n_epoch=null to "
            "count the interval in steps across epochs"
        )


def choose_run_dir(
    c: TrainConfig, hydra_dir: Path, attempt: rundir.Attempt
) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None): fresh, resumed or requeued
    (`vitexp.training.rundir`); recorded in `attempt` for a stop's clean-up."""
    run_dir, resume = rundir.resolve_run_dir(c, hydra_dir)
    attempt.run_dir, attempt.fresh = run_dir, rundir.is_fresh(run_dir, resume)
    return run_dir, resume


@dataclass
class Network:
    """The run's model and where its weights come from."""

    net: nn.Module
    resumed_step: int | None = None  # the step of the checkpoint it resumes from
    pretrained: Path | None = None  # stage=finetune: the checkpoint it starts from
    pretrained_meta: dict[str, Any] | None = None  # that checkpoint's record


def build_network(c: TrainConfig, num_classes: int, resume: Path | None) -> Network:
    """The seeded model; a checkpoint to resume from is checked against it (a broken, unsafe
    or other-model checkpoint stops here, clearly), a fine-tune loads its pretrained body."""
    L.seed_everything(c.seed, workers=True, verbose=False)
    network = Network(build_model(c.model, num_classes), pretrained_meta={})
    if resume is not None:
        saved = read_checkpoint(resume, "ckpt_path", weights=False)  # sharded: no weights
        if "vitexp" in saved:
            check_resumable(saved["vitexp"], network.net, resume)
        network.resumed_step = int(saved.get("global_step", 0))
    if c.stage == "finetune":
        network.pretrained = resolve_pretrained(c.pretrained)
        network.pretrained_meta = load_pretrained(
            network.pretrained, network.net, c.pretrained_weights
        )
    return network


def build_module(c: TrainConfig, net: nn.Module, data: ImageDataModule) -> ViTModule:
    """The LightningModule, with the record its checkpoints keep (`meta`)."""
    meta = {
        "stage": c.stage,
        "data": c.data.name,
        "class_names": data.class_names,  # the head's outputs, in order: what predictions say
        "eval_crop_pct": c.data.augment.crop_pct,  # the eval preprocessing (vitexp.predict)
        "ema_decay": c.ema.decay,
    }
    return ViTModule(
        net,
        c.optim,
        c.schedule,
        c.loss,
        meta,
        compile=speed_switches(c.trainer)[1],
        batch_mix=BatchMix.from_config(c.data.augment, data.num_classes),
    )


# --- every check passed: the run directory is written ----------------------------------------
def open_run_dir(
    cfg: DictConfig,
    c: TrainConfig,
    trainer: L.Trainer,
    network: Network,
    data: ImageDataModule,
    hydra_dir: Path,
    run_dir: Path,
    resume: Path | None,
) -> None:
    """Make the run directory, log to its train.log, say what the run is, and keep its
    config (and the wandb run's id)."""
    if run_dir != hydra_dir:
        rundir.remove_new_empty_dirs(hydra_dir)  # the fresh directory Hydra made for this attempt
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.log_to_file(run_dir)
    for line in describe_run(c, trainer, network.net, data.num_classes, run_dir, resume):
        log.info("%s", line)
    if c.data.num_classes is None:
        log.info("data.num_classes=%d, from the data (%s)", data.num_classes, data.origin)
    if network.pretrained is not None:
        averaged = network.pretrained_meta.get("ema_decay") is not None
        log.info(
            "fine-tuning from %s at %s%s",
            network.pretrained,
            network.net.img_size,
            f" ({c.pretrained_weights} weights: its run kept an EMA "
            f"{network.pretrained_meta['ema_decay']:g})"
            if averaged
            else "",
        )
        if (resampled := patch_resampling(network.pretrained_meta, network.net)) is not None:
            log.info("%s", resampled)
    if trainer.is_global_zero:
        rundir.write_config(cfg, run_dir, resumed=resume is not None)
        if c.logger.name == "wandb" and not (run_dir / "wandb_id.txt").is_file():
            write_atomic(run_dir / "wandb_id.txt", trainer.logger.version)


def describe_run(
    c: TrainConfig,
    trainer: L.Trainer,
    net: nn.Module,
    num_classes: int,
    run_dir: Path,
    resume: Path | None,
) -> list[str]:
    """The lines at the top of a run's console output and train.log: where it writes, the
    model, the data and the recipe."""
    t, m = c.trainer, c.model
    budget = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.max_epochs} epochs"
    precision, compiled = speed_switches(t)
    pos = pos_embed_record(m)
    variant = f", {pos['kind']}/{pos['placement']}, {m.pool}" if pos else ""
    n = sum(p.numel() for p in net.parameters())
    params = f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"
    return [
        f"run: {run_dir}" + (f" (resuming {resume})" if resume else ""),
        f"model: {m.name} ({params} parameters{variant})",
        f"data: {c.data.name}, {num_classes} classes, {c.stage}",
        f"recipe: {budget}, global batch {global_batch(c, trainer)}, {c.optim.name} lr "
        f"{c.optim.lr:g}, {precision}{', compiled' if compiled else ''}"
        + (f", EMA {c.ema.decay:g}" if c.ema.decay is not None else "")
        + f", {trainer.world_size} process(es)",
    ]


# --- after the fit ---------------------------------------------------------------------------
@dataclass
class Scores:
    """The test metrics and the probe's scores of the final model, and, where the run kept a
    weight average (the final model), the same of the trained weights."""

    metrics: dict[str, float]
    probe: dict[str, float] | None
    weights: str  # what the final model is: the average (described) or "trained"
    metrics_raw: dict[str, float] | None = None
    probe_raw: dict[str, float] | None = None


def test(
    trainer: L.Trainer,
    module: ViTModule,
    data: ImageDataModule,
    probe: Callable[[], dict[str, float] | None] = lambda: None,
) -> Scores:
    """Test the final model, then `probe` it (the few-shot evaluation); with a weight
    average, the same again with the trained weights swapped in."""
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    average = weight_average(trainer)
    scores = Scores(
        metrics={k: float(v) for k, v in tested.items()},
        probe=probe(),
        weights=average.describe() if average is not None else "trained",
    )
    if average is not None:  # the trained weights too, for comparison
        with average.trained_weights(module):
            module.test_key = "test_raw"
            tested_raw = trainer.test(module, datamodule=data, verbose=False)[0]
            module.test_key = "test"
            scores.probe_raw = probe()
        scores.metrics_raw = {
            k.replace("test_raw/", "test/"): float(v) for k, v in tested_raw.items()
        }
    return scores


def results_record(
    c: TrainConfig,
    trainer: L.Trainer,
    data: ImageDataModule,
    network: Network,
    scores: Scores,
    baselines: dict[str, float] | None,
    run_dir: Path,
    resume: Path | None,
    start: float,
) -> dict[str, Any]:
    """What results.json holds."""
    fewshot_init = next((cb.at_init for cb in trainer.callbacks if hasattr(cb, "at_init")), None)
    return {
        "status": "done",
        "stage": c.stage,
        "experiment": rundir.experiment_name(),
        "name": c.name,
        "data": c.data.name,
        "data_subset": c.data.subset,
        "train_images": data.train_images,
        "class_names": data.class_names,
        "model": c.model.name,
        "pos_embed": pos_embed_record(c.model),
        "seed": c.seed,
        "metrics": scores.metrics,
        "weights": scores.weights,
        "metrics_raw": scores.metrics_raw,
        "fewshot": scores.probe,
        "fewshot_raw": scores.probe_raw,
        "fewshot_init": fewshot_init,  # the same probe on this run's random initialisation
        "fewshot_report": (
            f"{c.fewshot.data.name}/{c.fewshot.report_shot}shot" if scores.probe else None
        ),
        "baselines": baselines,
        **training_facts(trainer, c, run_dir),
        "pretrained": str(network.pretrained) if network.pretrained else None,
        "pretrained_data": network.pretrained_meta.get("data"),
        "resumed_from": str(resume) if resume else None,
        "resumed_at_step": network.resumed_step,
        "slurm_job_id": slurm_job_id(),
        "slurm_restarts": requeue_count(),
        "wall_time_s": round(time.time() - start, 2),
        "run_dir": str(run_dir),
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
    }


def write_results(results: dict[str, Any], c: TrainConfig, run_dir: Path) -> None:
    """results.json (rank zero calls this), and the test accuracy in one line (of the final
    and of the trained weights, where they differ)."""
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    log.info(
        "%s on %s: test accuracy %.4f after %d steps (%.0f s) -> %s/results.json",
        c.stage,
        c.data.name,
        results["metrics"].get("test/acc"),
        results["steps"],
        results["wall_time_s"],
        run_dir,
    )
    if results["metrics_raw"] is not None:
        log.info(
            "test accuracy %.4f with the %s weights, %.4f with the trained ones",
            results["metrics"].get("test/acc"),
            results["weights"],
            results["metrics_raw"].get("test/acc"),
        )


def global_batch(c: TrainConfig, trainer: L.Trainer) -> int:
    """Images per optimizer step: per device x devices x accumulation."""
    return c.data.batch_size * trainer.world_size * trainer.accumulate_grad_batches


def training_facts(trainer: L.Trainer, c: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """What the fit did: steps, batch, epochs, best validation score and checkpoints."""
    best = trainer.checkpoint_callbacks[0]
    return {
        "best_val_acc": None if best.best_model_score is None else float(best.best_model_score),
        "steps": trainer.global_step,
        "world_size": trainer.world_size,
        "global_batch_size": global_batch(c, trainer),
        "epochs": trainer.current_epoch,
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "best_checkpoint": best.best_model_path or None,
    }


def pos_embed_record(m: Any) -> dict[str, str] | None:
    """The Table-8 cell of a ViT (kind, placement); None for a model without one (a CNN)."""
    pos = getattr(m, "pos_embed", None)
    return None if pos is None else {"kind": pos.kind, "placement": pos.placement}
