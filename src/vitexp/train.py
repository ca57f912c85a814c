"""`python -m vitexp.train [+experiment=NAME] [key=value ...]`: pretrain or fine-tune a ViT.

    compose -> validate -> data -> run dir -> model (+ pretrained weights) -> fit -> test
    -> results.json

A run writes to its directory: config.yaml (resolved), checkpoints/ (last.ckpt, best-*.ckpt),
logs/ (the logger's files), train.log, results.json. `ckpt_path=last` continues the newest
run of the same name in its own directory (`vitexp.training.rundir`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vitexp.config import CONFIG_DIR, TrainConfig, register_configs, validate
from vitexp.data.files import write_atomic
from vitexp.errors import ConfigError, Interrupted, Terminated
from vitexp.models import NotApplicableCell

# only what composing and validating a config needs: Lightning, the data and the trainer
# are imported once the config is valid, so a bad value is reported in seconds
from vitexp.training import rundir
from vitexp.training.cli import in_multirun, one_line, run_cli, single_run_errors

if TYPE_CHECKING:
    import lightning as L
    from torch import nn

log = logging.getLogger("vitexp")


def run(cfg: DictConfig, hydra_dir: Path | None = None) -> dict[str, Any]:
    """Validate, train, test; returns what results.json holds. Every check (config, data,
    device, run directory, checkpoints) runs before the run directory gets any file. A stop
    by signal or a damaged compile cache, wherever it lands, becomes one line
    (`vitexp.training.stopping`)."""
    attempt = rundir.Attempt()
    try:
        return _run(cfg, hydra_dir, attempt)
    except BaseException as err:
        stop = stopped(err, attempt)
        if stop is None:
            raise
        raise stop from None


def _run(cfg: DictConfig, hydra_dir: Path | None, attempt: rundir.Attempt) -> dict[str, Any]:
    """`run`, recording in `attempt` what it has set up (for a stop's line and clean-up)."""
    start = time.time()
    c = validate(cfg)
    attempt.ckpt_path = c.ckpt_path
    import lightning as L

    from vitexp.analysis.baselines import (
        BASELINE_SOURCES,
        beside_published,
        pixel_baselines,
        side_by_side,
    )
    from vitexp.data import ImageDataModule
    from vitexp.data.transforms import BatchMix
    from vitexp.models import build_model
    from vitexp.training.callbacks import requeue_count, slurm_job_id
    from vitexp.training.checkpoint import (
        check_resumable,
        load_pretrained,
        read_checkpoint,
        resolve_pretrained,
    )
    from vitexp.training.module import ViTModule
    from vitexp.training.progress import quiet_console
    from vitexp.training.trainer import build_trainer, check_device, speed_switches, weight_average

    quiet_console()
    hydra_dir = Path(hydra_dir or rundir.hydra_run_dir())
    if (finished := rundir.finished_requeue(hydra_dir)) is not None:
        return finished
    data = ImageDataModule(c.data, c.model.img_size, c.model.mean, c.model.std, c.seed)
    check_data(c, data)  # missing or mismatched data is named before anything else
    check_device(c.trainer)
    run_dir, resume = rundir.resolve_run_dir(c, hydra_dir)
    attempt.run_dir, attempt.fresh = run_dir, rundir.is_fresh(run_dir, resume)

    L.seed_everything(c.seed, workers=True, verbose=False)
    net = build_model(c.model, data.num_classes)
    resumed_step = None
    if resume is not None:  # a broken, unsafe or other-model checkpoint stops here, clearly
        saved = read_checkpoint(resume, "ckpt_path", weights=False)  # sharded: no weights
        if "vitexp" in saved:
            check_resumable(saved["vitexp"], net, resume)
        resumed_step = int(saved.get("global_step", 0))
    pretrained, pretrained_meta = None, {}
    if c.stage == "finetune":
        pretrained = resolve_pretrained(c.pretrained)
        pretrained_meta = load_pretrained(pretrained, net, c.pretrained_weights)
    meta = {
        "stage": c.stage,
        "data": c.data.name,
        "class_names": data.class_names,  # the head's outputs, in order: what predictions say
        "eval_crop_pct": c.data.augment.crop_pct,  # the eval preprocessing (vitexp.predict)
        "ema_decay": c.ema.decay,
    }
    module = ViTModule(
        net,
        c.optim,
        c.schedule,
        c.loss,
        meta,
        compile=speed_switches(c.trainer)[1],
        batch_mix=BatchMix.from_config(c.data.augment, data.num_classes),
    )
    evaluator = None
    if c.stage == "pretrain" and c.fewshot.enabled:
        from vitexp.analysis.fewshot import FewShotEvaluator

        evaluator = FewShotEvaluator(c.fewshot, net.img_size, c.model.mean, c.model.std)
    trainer = build_trainer(c, run_dir, evaluator)
    attempt.trainer = trainer

    # --- every check passed: now the run directory is written
    if run_dir != hydra_dir:
        rundir.remove_new_empty_dirs(hydra_dir)  # the fresh directory Hydra made for this attempt
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.log_to_file(run_dir)
    for line in describe_run(c, trainer, net, data.num_classes, run_dir, resume):
        log.info("%s", line)
    if c.data.num_classes is None:
        log.info("data.num_classes=%d, from the data (%s)", data.num_classes, data.origin)
    if pretrained is not None:
        averaged = pretrained_meta.get("ema_decay") is not None
        log.info(
            "fine-tuning from %s at %s%s",
            pretrained,
            net.img_size,
            f" ({c.pretrained_weights} weights: its run kept an EMA "
            f"{pretrained_meta['ema_decay']:g})"
            if averaged
            else "",
        )
    if trainer.is_global_zero:
        rundir.write_config(cfg, run_dir, resumed=resume is not None)
        if c.logger.name == "wandb" and not (run_dir / "wandb_id.txt").is_file():
            write_atomic(run_dir / "wandb_id.txt", trainer.logger.version)

    # a stop by signal (SIGTERM, preemption, Ctrl-C) from here on ends in `stopped`
    trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    # with ema.decay, the model now holds the average: test, few-shot and figures are of it
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    fewshot = evaluator.evaluate(net) if evaluator and trainer.is_global_zero else None
    fewshot_init = next((cb.at_init for cb in trainer.callbacks if hasattr(cb, "at_init")), None)
    average = weight_average(trainer)
    raw_metrics = fewshot_raw = None
    if average is not None:  # the trained weights too, for comparison
        with average.trained_weights(module):
            module.test_key = "test_raw"
            tested_raw = trainer.test(module, datamodule=data, verbose=False)[0]
            module.test_key = "test"
            fewshot_raw = evaluator.evaluate(net) if evaluator and trainer.is_global_zero else None
        raw_metrics = {k.replace("test_raw/", "test/"): float(v) for k, v in tested_raw.items()}
    baselines = None
    if c.data.source in BASELINE_SOURCES and c.data.subset is None and trainer.is_global_zero:
        baselines = pixel_baselines(*map(data.raw_split, ("train", "val", "test")))

    results = {
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
        "metrics": {k: float(v) for k, v in tested.items()},
        "weights": average.describe() if average is not None else "trained",
        "metrics_raw": raw_metrics,
        "fewshot": fewshot,
        "fewshot_raw": fewshot_raw,
        "fewshot_init": fewshot_init,  # the same probe on this run's random initialisation
        "fewshot_report": f"{c.fewshot.data.name}/{c.fewshot.report_shot}shot" if fewshot else None,
        "baselines": baselines,
        **training_facts(trainer, c, run_dir),
        "pretrained": str(pretrained) if pretrained else None,
        "pretrained_data": pretrained_meta.get("data"),
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
        log.info(
            "%s on %s: test accuracy %.4f after %d steps (%.0f s) -> %s/results.json",
            c.stage,
            c.data.name,
            results["metrics"].get("test/acc"),
            results["steps"],
            results["wall_time_s"],
            run_dir,
        )
        if raw_metrics is not None:
            log.info(
                "test accuracy %.4f with the %s weights, %.4f with the trained ones",
                results["metrics"].get("test/acc"),
                results["weights"],
                raw_metrics.get("test/acc"),
            )
        if baselines is not None:
            log.info("%s", side_by_side(results["metrics"]["test/acc"], baselines, c.data.name))
        published = beside_published(results["metrics"]["test/acc"], c.data.source)
        if published and c.data.subset is None and c.data.classes is None:  # the whole set
            log.info("%s", published)
    rundir.stop_logging_to_file()
    return results


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


def stopped(err: BaseException, attempt: rundir.Attempt) -> BaseException | None:
    """What a stop by signal, or a damaged compile cache, becomes: its line in train.log, the
    run directory removed if it holds nothing of value, and the one-line error to raise
    (None for any other error)."""
    from vitexp.training.stopping import as_stop

    stop = as_stop(err, attempt.run_dir, attempt.trainer, attempt.ckpt_path)
    if stop is None:
        return None
    rundir.stop_logging_to_file(str(stop))
    if is_rank_zero():
        rundir.discard_if_worthless(attempt)
    if stop.exit_code == Interrupted.exit_code and os.environ.get("SLURM_JOB_ID"):
        # SLURM requeues or cancels the job: no result (a failed one) for submitit
        print(f"error: {stop}", file=sys.stderr, flush=True)
        sys.exit(Interrupted.exit_code)
    if in_multirun() and isinstance(stop, Interrupted):
        # the whole sweep stops (Hydra would go on to the next job after an Exception)
        sweep_stop = Terminated if stop.exit_code == Interrupted.exit_code else KeyboardInterrupt
        return sweep_stop(str(stop))
    return stop


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
    from vitexp.training.trainer import speed_switches

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


def is_rank_zero() -> bool:
    """Rank 0, or a single process (a config error comes before Lightning is imported)."""
    if "lightning" not in sys.modules:
        return True
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0


register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@single_run_errors
def _hydra_main(cfg: DictConfig) -> float | None:
    """Hydra's entry: returns the test accuracy for sweepers. In a sweep, the paper's N/A
    cells are recorded and skipped, so a full 4 x 3 grid finishes with exit code 0."""
    try:
        return run(cfg)["metrics"].get("test/acc")
    except NotApplicableCell as err:
        if not in_multirun():
            rundir.remove_new_empty_dirs(rundir.hydra_run_dir())
            raise
        log.info("skipping an N/A cell: %s", err)
        rundir.record_sweep_job(cfg, "n/a", str(err))
        return None
    except BaseException as err:
        rundir.stop_logging_to_file(one_line(err))
        if in_multirun() and is_rank_zero() and isinstance(err, Exception):
            rundir.record_sweep_job(cfg, "failed", one_line(err))
        elif not in_multirun():
            rundir.remove_new_empty_dirs(rundir.hydra_run_dir())
        raise


def main() -> None:
    run_cli(_hydra_main)


if __name__ == "__main__":
    sys.exit(main())
