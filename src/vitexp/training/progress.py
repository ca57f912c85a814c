"""What a run shows while it trains: the progress bar (without a host-device sync at every
step), a line per validation, and a console without the libraries' chatter."""

from __future__ import annotations

import logging
import logging.handlers

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

    def _get_train_description(self, current_epoch: int) -> str:
        """`step 120/2100 (epoch 1)` instead of Lightning's `Epoch 1/-2` for step budgets."""
        trainer = self.trainer
        steps = trainer.max_steps if trainer.max_steps > 0 else None
        done = trainer.global_step
        return f"step {done}/{steps} (epoch {current_epoch})" if steps else f"epoch {current_epoch}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, description=description)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        step = trainer.global_step
        stale = self._read_at is None or (step != self._read_at and step % self.every_n_steps == 0)
        if not trainer.training or stale:
            self._metrics = super().get_metrics(trainer, pl_module)
            self._metrics.pop("v_num", None)  # the logger's version: not a metric
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


# library warnings that say nothing about the run: to train.log only
HARMLESS_WARNINGS = (
    "The `srun` command is available on your system but is not used",  # any SLURM host
    "`isinstance(treespec, LeafSpec)` is deprecated",  # Lightning's own use of torch
)
# torch's notices that say nothing about the run, logged by torch: to train.log only
FILE_ONLY = {
    # a CPU-only torch where CUDA_HOME exists, when torch.compile builds its C++ kernels
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}
FILE_ONLY_LOG = "vitexp-file-only"  # where they go: a logger with no console handler
CHATTY = ("lightning.pytorch", "lightning.fabric", "py.warnings", FILE_ONLY_LOG)  # routed here
EARLY = "vitexp-early"  # the buffer of what they say before train.log exists


class ConsoleFilter(logging.Filter):
    """On the console only: Lightning's info lines (devices, tips, why fit stopped) and the
    harmless warnings go to train.log alone; Lightning's warnings and errors still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("lightning") and record.levelno < logging.WARNING:
            return False
        if record.name == "py.warnings":
            return not any(text in record.getMessage() for text in HARMLESS_WARNINGS)
        return True


class FileOnly(logging.Filter):
    """On one of torch's loggers: hand its notice (FILE_ONLY) to train.log, not the console."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        logging.getLogger(FILE_ONLY_LOG).handle(record)
        return False


def route_file_only() -> None:
    """FILE_ONLY's notices to FILE_ONLY_LOG, which has no console handler (a NullHandler
    keeps Python's last-resort handler from printing them when train.log is closed)."""
    target = logging.getLogger(FILE_ONLY_LOG)
    target.propagate = False
    if not target.handlers:
        target.addHandler(logging.NullHandler())
    for name, text in FILE_ONLY.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, FileOnly) for f in logger.filters):
            logger.addFilter(FileOnly(text))


def quiet_console() -> None:
    """Route library chatter away from the console (warnings become log records, so that
    they can be routed) and keep what it says before the run directory exists, for
    train.log (`vitexp.training.rundir.log_to_file` flushes it there)."""
    logging.captureWarnings(True)
    route_file_only()
    # "lightning" has a console handler of its own, and its packages propagate to it (and
    # to the root logger, when they are imported after Hydra set that up): stop there, so
    # that each line reaches one console handler
    logging.getLogger("lightning").propagate = False
    for name in ("", "lightning", *CHATTY):
        for handler in logging.getLogger(name).handlers:
            console = type(handler) is logging.StreamHandler
            if console and not any(isinstance(f, ConsoleFilter) for f in handler.filters):
                handler.addFilter(ConsoleFilter())
    early = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    early.set_name(EARLY)
    for name in CHATTY:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.name == EARLY]:
            logger.removeHandler(old)
        logger.addHandler(early)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)


def flush_early_log(target: logging.Handler) -> None:
    """Write what the libraries said before train.log existed into it, and stop buffering."""
    for name in CHATTY:
        logger = logging.getLogger(name)
        for early in [h for h in logger.handlers if h.name == EARLY]:
            early.setTarget(target)
            early.flush()
            logger.removeHandler(early)
            early.close()
