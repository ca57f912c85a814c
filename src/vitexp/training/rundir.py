"""A run's directory: which one a run writes to (fresh, resumed, requeued), its train.log,
its config snapshot, and what a sweep job leaves there when it is skipped or fails.

A fresh run never writes into a directory that holds a run; a run stopped by a check
leaves no directory behind (Hydra makes one before any check).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vitexp.config import TrainConfig, without_hydra
from vitexp.data.files import write_atomic
from vitexp.errors import CheckpointError, ConfigError

log = logging.getLogger("vitexp")
_IMPORTED_AT = time.time() - 1.0  # mtime granularity: a directory Hydra makes is newer


def hydra_run_dir() -> Path:
    """The directory Hydra made for this run (or sweep job)."""
    return Path(HydraConfig.get().runtime.output_dir)


def finished_requeue(hydra_dir: Path) -> dict | None:
    """A requeued SLURM job whose run had already finished: its results."""
    from vitexp.training.callbacks import requeue_count

    if requeue_count() > 0 and (hydra_dir / "results.json").is_file():
        log.info("requeued SLURM job had finished: %s/results.json", hydra_dir)
        return json.loads((hydra_dir / "results.json").read_text())
    return None


def resolve_run_dir(c: TrainConfig, hydra_dir: Path) -> tuple[Path, Path | None]:
    """(directory this run writes to, checkpoint to resume from or None).

    A fresh run refuses a directory that already holds checkpoints or results, so that
    nothing is overwritten; a resumed run continues in the directory of its checkpoint.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from vitexp.training.callbacks import requeue_count
    from vitexp.training.checkpoint import checkpoint_exists

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


RUN_LOG = "vitexp-train-log"  # the name of the train.log handler of the run in progress


def logged() -> tuple[str, ...]:
    """The loggers whose records train.log keeps: vitexp's and Lightning's."""
    from vitexp.training.progress import CHATTY

    return ("vitexp", *CHATTY)


def log_to_file(run_dir: Path) -> None:
    """train.log: the run's console lines (vitexp's and Lightning's messages, the progress
    at each validation, the result, any error), on rank 0."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from vitexp.training.progress import flush_early_log

    if rank_zero_only.rank != 0:
        return
    stop_logging_to_file()
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    handler.set_name(RUN_LOG)
    flush_early_log(handler)  # what Lightning said while the Trainer was built
    for name in logged():
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)


def stop_logging_to_file(error: str | None = None) -> None:
    """Close train.log, with the error line that ended the run (only there: the console
    gets it from the command line's handler). Imports nothing heavy when no run began: a
    config error exits at once."""
    # found through the logger, not kept in a global: submitit pickles this module's
    # functions with their globals when it requeues a job, and a handler holds a lock
    handler = next((h for h in logging.getLogger("vitexp").handlers if h.name == RUN_LOG), None)
    if handler is None:
        return
    if error:
        handler.handle(logging.makeLogRecord({"msg": f"error: {error}", "levelname": "ERROR"}))
    for name in logged():
        logging.getLogger(name).removeHandler(handler)
    handler.close()


@dataclass
class Attempt:
    """What a run has set up so far: what a stop says it kept, and what it removes."""

    ckpt_path: str | None = None  # as given, before the run directory is known
    run_dir: Path | None = None
    fresh: bool = False  # run_dir held nothing before: all it holds is this attempt's
    trainer: Any = None


def is_fresh(run_dir: Path, resume: Path | None) -> bool:
    """A run directory that this process made (Hydra, at its start) and that holds nothing
    yet: a stop may remove it."""
    if resume is not None or not run_dir.is_dir():
        return resume is None
    return run_dir.stat().st_mtime >= _IMPORTED_AT and not any(run_dir.iterdir())


def holds_value(run_dir: Path) -> bool:
    """A checkpoint (not a half-written `.partial` one), results.json or failed.json."""
    ckpts = run_dir / "checkpoints"
    saved = ckpts.is_dir() and any(not p.name.startswith(".") for p in ckpts.iterdir())
    return saved or any((run_dir / name).exists() for name in ("results.json", "failed.json"))


def discard_if_worthless(attempt: Attempt) -> None:
    """Remove the run directory of an attempt that stopped early, when it was fresh and
    still holds nothing of value: only this attempt's config.yaml, train.log and logs."""
    run_dir = attempt.run_dir
    if run_dir is None or not attempt.fresh or not run_dir.is_dir() or holds_value(run_dir):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    remove_new_empty_dirs(run_dir.parent)  # the date folder Hydra made for it, if empty


def remove_new_empty_dirs(path: Path, since: float | None = None) -> None:
    """Remove `path` and its parents while they are empty and were made by this process
    (after `since`, default: when this module was imported): Hydra makes the run
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


def experiment_name() -> str | None:
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("experiment")
    return None


def write_config(cfg: DictConfig, run_dir: Path, resumed: bool) -> None:
    """config.yaml (config.resume.yaml for a resumed attempt): the resolved config."""
    name = "config.resume.yaml" if resumed else "config.yaml"
    write_atomic(run_dir / name, OmegaConf.to_yaml(OmegaConf.create(without_hydra(cfg))))


def record_sweep_job(cfg: DictConfig, status: str, reason: str) -> None:
    """In a sweep, leave a record for the report: results.json for an N/A cell (not trained),
    failed.json for a job that failed. Never touches a directory that holds results."""
    write_job_record(hydra_run_dir(), cfg, status, reason, list(HydraConfig.get().overrides.task))


def write_job_record(
    job_dir: Path, cfg: DictConfig, status: str, reason: str, overrides: list[str]
) -> None:
    """The record of a job that produced no results (`status` n/a or failed), in the shape
    vitexp.report reads beside real results; a sweep and `make reproduce` both write it."""
    if (job_dir / "results.json").exists():
        return
    record = {
        "status": status,
        "reason": reason,
        "name": cfg.name,
        "seed": cfg.seed,
        "data": cfg.data.name,
        "pos_embed": {"kind": cfg.model.pos_embed.kind, "placement": cfg.model.pos_embed.placement},
        "overrides": overrides,
    }
    job_dir.mkdir(parents=True, exist_ok=True)
    target = "results.json" if status == "n/a" else "failed.json"
    write_atomic(job_dir / target, json.dumps(record, indent=2) + "\n")
