"""A run that stops early, wherever the stop lands (data setup, model build, the first
torch.compile, a validation, a training step, the test): one line says what was kept (the
checkpoint to resume from, or nothing), the exit code says why (130 Ctrl-C, 143 SIGTERM, 1
a damaged compile cache), and a run directory that holds nothing of value is removed.

How the signal arrives depends on when:

- outside `trainer.fit`, and inside it until Lightning installs its handler: Ctrl-C is
  Python's KeyboardInterrupt, SIGTERM `vitexp.errors.Terminated` (`vitexp.training.cli.run_cli`);
- inside fit, until a training batch has finished (nothing to save yet), the same, at once
  (`vitexp.training.callbacks.PreemptionCheckpoint`); after that, Lightning's `SIGTERMException` at
  the end of the batch, once last.ckpt holds it;
- Lightning turns a KeyboardInterrupt inside fit or test into `SystemExit(1)`, whose
  `__context__` still says which.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from vitexp.errors import CheckpointError, Interrupted, Terminated, VitexpError
from vitexp.training import rundir
from vitexp.training.cli import in_multirun

CTRL_C = "interrupted (Ctrl-C)"
SIGNALLED = "stopped by a signal"


class CompileCacheError(VitexpError):
    """torch.compile failed on a file of its cache that it could not load."""

    exit_code = 1


def stop_signal(err: BaseException, trainer: Any = None) -> signal.Signals | None:
    """SIGINT (Ctrl-C) or SIGTERM when `err` is how a signal stopped the run, else None."""
    graceful = _sigterm_exception()  # Lightning's stop at a batch end: a SystemExit too
    if isinstance(err, SystemExit) and not isinstance(err, graceful):
        err = err.__context__  # Lightning's exit after a KeyboardInterrupt it caught
    if not isinstance(err, (KeyboardInterrupt, graceful)):
        return None
    if interrupted_by_user(trainer) or type(err) is KeyboardInterrupt:
        return signal.SIGINT
    return signal.SIGTERM


def _sigterm_exception() -> type | tuple:
    """Lightning's graceful stop, when Lightning is imported (a stop can come before)."""
    module = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return getattr(module, "SIGTERMException", ())


def interrupted_by_user(trainer: Any) -> bool:
    """Ctrl-C seen by vitexp.training.callbacks.PreemptionCheckpoint (not SIGTERM or preemption)."""
    return any(getattr(cb, "interrupted", False) for cb in getattr(trainer, "callbacks", []))


def what_was_kept(run_dir: Path | None, step: int, resuming: str | None = None) -> str:
    """The checkpoint to resume from, or that there is none. `resuming`: the run's
    ckpt_path, for a stop before its run directory was known."""
    if run_dir is None:  # stopped during data setup: nothing written yet
        if resuming:
            return f"nothing written: resume as before, with ckpt_path={resuming}"
        return "nothing to resume: no step finished"
    from vitexp.training.checkpoint import checkpoint_exists

    last = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint_exists(last):
        return "nothing to resume: " + ("no checkpoint saved yet" if step else "no step finished")
    saved = saved_step(last)
    held = "that step" if saved == step else f"step {saved}"
    return f"{last} holds {held}: resume with ckpt_path=last"


def stop_line(how: str, run_dir: Path | None, step: int, resuming: str | None = None) -> str:
    """`how` (at which step), then what was kept."""
    kept = what_was_kept(run_dir, step, resuming)
    at = f" at step {step}" if step else ""
    return f"{how}{at}{':' if kept.startswith('nothing') else ';'} {kept}"


def saved_step(ckpt: Path) -> int | str:
    from vitexp.training.checkpoint import read_checkpoint

    try:
        return int(read_checkpoint(ckpt, "ckpt_path", weights=False).get("global_step", 0))
    except CheckpointError:
        return "?"


def as_stop(
    err: BaseException, run_dir: Path | None, trainer: Any, resuming: str | None = None
) -> VitexpError | None:
    """The one-line error a stop by signal or a damaged compile cache becomes (None for
    any other error): Interrupted (exit 130 / 143) or CompileCacheError (exit 1)."""
    step = int(getattr(trainer, "global_step", 0) or 0)
    sig = stop_signal(err, trainer)
    if sig == signal.SIGINT:
        graceful = isinstance(err, _sigterm_exception()) or not interrupted_by_user(trainer)
        how = CTRL_C if graceful else "stopped at once by a second Ctrl-C"
        return Interrupted(stop_line(how, run_dir, step, resuming), exit_code=130)
    if sig == signal.SIGTERM:
        line = stop_line(SIGNALLED, run_dir, step, resuming)
        requeue = " (a requeued SLURM job resumes by itself)" if line.endswith("=last") else ""
        return Interrupted(line + requeue)
    folder = damaged_compile_cache(err)
    if folder is None:
        return None
    return CompileCacheError(
        f"torch.compile could not load a file of its cache {folder}, damaged (e.g. by a "
        f"compile that was interrupted): remove that folder (rm -rf {folder}) or set "
        f"trainer.compile=false, and run again; {what_was_kept(run_dir, step, resuming)}"
    )


def inductor_cache_dir() -> str:
    """torch's inductor cache folder (TORCHINDUCTOR_CACHE_DIR, else torch's default), as
    torch spells it in its messages; without creating it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())


# what the loader says of a compiled kernel (.so) cut short, e.g. by a kill mid-compile
DAMAGED_FILE = re.compile(r"\.so\S*: (file too short|cannot read file data|invalid ELF header)")


def damaged_compile_cache(err: BaseException) -> str | None:
    """The inductor cache folder, when `err` (torch.compile's BackendCompilerFailed or
    InductorError, any depth) comes from a file of that cache that could not be loaded."""
    if "torch._inductor" not in sys.modules:  # torch.compile never ran: not its error
        return None
    folder = inductor_cache_dir()
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        text = str(err)
        loading = isinstance(err, (ImportError, OSError)) or "ImportError: " in text
        if DAMAGED_FILE.search(text) or (loading and folder + os.sep in text):
            return folder
        err = err.__cause__ or getattr(err, "inner_exception", None) or err.__context__
    return None


# --- the stop of a run ----------------------------------------------------------------------
def stopped(err: BaseException, attempt: rundir.Attempt) -> BaseException | None:
    """What a stop by signal, or a damaged compile cache, becomes: its line in train.log, the
    run directory removed if it holds nothing of value, and the one-line error to raise
    (None for any other error)."""
    stop = as_stop(err, attempt.run_dir, attempt.trainer, attempt.ckpt_path)
    if stop is None:
        return None
    rundir.stop_logging_to_file(str(stop))
    if not is_rank_zero():
        sys.exit(stop.exit_code)  # every rank stopped at the same step: rank 0 says so, once
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


def is_rank_zero() -> bool:
    """Rank 0, or a single process (a config error comes before Lightning is imported)."""
    if "lightning" not in sys.modules:
        return True
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0
