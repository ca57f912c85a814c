"""`python -m vitexp.train [+experiment=NAME] [key=value ...]`: pretrain or fine-tune a ViT.

    compose -> validate -> data -> run dir -> model (+ pretrained weights) -> fit -> test
    -> results.json

A run writes to its directory: config.yaml (resolved), checkpoints/ (last.ckpt, best-*.ckpt),
logs/ (the logger's files), train.log, results.json. `ckpt_path=last` continues the newest
run of the same name in its own directory (`vitexp.training.rundir`). The steps are
`vitexp.training.steps`; this module adds what comes from vitexp.analysis: the few-shot
probe, the paper's figures and the pixel baselines.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

# only what composing and validating a config needs: Lightning, the data and the trainer
# are imported once the config is valid, so a bad value is reported in seconds
from vitexp.config import CONFIG_DIR, TrainConfig, register_configs, validate
from vitexp.models import NotApplicableCell
from vitexp.training import rundir
from vitexp.training.cli import in_multirun, one_line, run_cli, single_run_errors
from vitexp.training.stopping import is_rank_zero, stopped

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
    from vitexp.training import steps
    from vitexp.training.progress import quiet_console
    from vitexp.training.trainer import build_trainer

    quiet_console()
    hydra_dir = Path(hydra_dir or rundir.hydra_run_dir())
    if (finished := rundir.finished_requeue(hydra_dir)) is not None:
        return finished
    data = steps.prepare_data(c)
    run_dir, resume = steps.choose_run_dir(c, hydra_dir, attempt)
    network = steps.build_network(c, data.num_classes, resume)
    module = steps.build_module(c, network.net, data)
    evaluator = fewshot_evaluator(c, network.net)
    trainer = build_trainer(c, run_dir, fewshot_callbacks(evaluator), figures_callbacks(c, run_dir))
    attempt.trainer = trainer
    # --- every check passed: now the run directory is written
    steps.open_run_dir(cfg, c, trainer, network, data, hydra_dir, run_dir, resume)
    # a stop by signal (SIGTERM, preemption, Ctrl-C) from here on ends in `stopped`
    trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    # with ema.decay, the model now holds the average: test, few-shot and figures are of it
    scores = steps.test(trainer, module, data, fewshot_probe(evaluator, trainer, network.net))
    baselines = baseline_scores(c, data, trainer)
    results = steps.results_record(
        c, trainer, data, network, scores, baselines, run_dir, resume, start
    )
    if trainer.is_global_zero:
        steps.write_results(results, c, run_dir)
        log_beside_baselines(results["metrics"]["test/acc"], baselines, c)
    rundir.stop_logging_to_file()
    return results


# --- what vitexp.analysis adds to a run --------------------------------------------------------
def fewshot_evaluator(c: TrainConfig, net: nn.Module) -> Any:
    """Pretraining: the few-shot probe on dataset B (vitexp.analysis.fewshot), else None."""
    if c.stage != "pretrain" or not c.fewshot.enabled:
        return None
    from vitexp.analysis.fewshot import FewShotEvaluator

    return FewShotEvaluator(c.fewshot, net.img_size, c.model.mean, c.model.std)


def fewshot_callbacks(evaluator: Any) -> list[L.Callback]:
    """The probe at every validation (and once on the initialisation), as a callback."""
    if evaluator is None:
        return []
    from vitexp.analysis.fewshot import FewShotCallback

    return [FewShotCallback(evaluator)]


def fewshot_probe(evaluator: Any, trainer: L.Trainer, net: nn.Module) -> Callable[[], Any]:
    """The probe of the final model (rank zero), for `steps.test`: None without one."""
    if evaluator is None or not trainer.is_global_zero:
        return lambda: None
    return lambda: evaluator.evaluate(net)


def figures_callbacks(c: TrainConfig, run_dir: Path) -> list[L.Callback]:
    """Pretraining a ViT: the paper's four figures at the end (vitexp.analysis.figures)."""
    if c.stage != "pretrain" or not c.figures:
        return []
    from vitexp.analysis.figures import FiguresCallback, draws

    if not draws(c.model):
        log.info("figures: the paper's figures are of ViTs; none for %s", c.model.name)
        return []
    return [FiguresCallback(run_dir / "figures", c.model.mean, c.model.std)]


def baseline_scores(c: TrainConfig, data: Any, trainer: L.Trainer) -> dict[str, float] | None:
    """Small in-memory data (digits), whole: the raw-pixel baselines' test accuracy."""
    from vitexp.analysis.baselines import BASELINE_SOURCES, pixel_baselines

    if c.data.source in BASELINE_SOURCES and c.data.subset is None and trainer.is_global_zero:
        return pixel_baselines(*map(data.raw_split, ("train", "val", "test")))
    return None


def log_beside_baselines(test_acc: float, baselines: dict | None, c: TrainConfig) -> None:
    """The test accuracy beside the pixel baselines, and beside the published numbers of a
    whole data set that has them."""
    from vitexp.analysis.baselines import beside_published, side_by_side

    if baselines is not None:
        log.info("%s", side_by_side(test_acc, baselines, c.data.name))
    published = beside_published(test_acc, c.data.source)
    if published and c.data.subset is None and c.data.classes is None:  # the whole set
        log.info("%s", published)


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
