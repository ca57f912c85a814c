"""When checkpoints/last.ckpt is written: at every validation, every n training steps, and
when the cluster signals a preemption (then the job is requeued).

Preemption, who does what (one owner each, so that nothing is requeued twice):

- Lightning notices SIGTERM and stops at the end of the current training batch, or of the
  validation under way (`SIGTERMException`); vitexp's `PreemptionCheckpoint` turns SIGUSR1
  / SIGUSR2 (the signals SLURM sends ahead of a time limit or preemption:
  `--signal=USR1@120`, submitit's USR2) into that same stop, and saves
  `checkpoints/last.ckpt` there: the state of a whole batch, so the resumed run continues
  exactly.
- Requeueing belongs to submitit when the job came through `hydra/launcher=slurm` (its
  USR2 handler is called after the save: it requeues and exits); under plain `sbatch`,
  vitexp runs `scontrol requeue` itself. Lightning's own SLURM auto-requeue (which saves in
  the middle of a step) is switched off.
- A requeued job (SLURM_RESTART_COUNT > 0) resumes from its run directory's last.ckpt
  without being told (`vitexp.training.rundir.resolve_run_dir`).
- Until a training batch has finished there is nothing to save: SIGTERM and Ctrl-C stop at
  once (`Terminated`, KeyboardInterrupt), and `vitexp.training.stopping` says so in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vitexp.errors import Terminated
from vitexp.training.checkpoint import SHARDED_META, checkpoint_exists, is_sharded, remove_path

log = logging.getLogger("vitexp")
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes (array task ids included), or None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_count() -> int:
    """How many times SLURM has requeued this job (0 outside SLURM)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


class LastCheckpoint(Checkpoint):
    """last.ckpt at the end of every validation, every `every_n_steps` training steps and at
    the end of training (Lightning's ModelCheckpoint writes `last` only with a top-k save).

    A `Checkpoint`, so that Lightning runs it after the ModelCheckpoint listed before it: the
    last.ckpt of a validation then knows the best-*.ckpt that this validation wrote.
    """

    def __init__(self, path: Path, every_n_steps: int | None = None) -> None:
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)  # the final weights, whatever the intervals: fine-tuning reads them


STOP_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # vitexp's exits on Ctrl-C, SIGTERM


class PreemptionCheckpoint(Checkpoint):
    """Save last.ckpt when a signal stops the run; then hand a preemption signal on.

    The save happens at the first of Lightning's own checkpoint points after the signal (end
    of the training batch, of the epoch, of a validation), whose state Lightning restores
    exactly; the exception handler saves only if the run stopped before reaching one.
    A `Checkpoint`, so that Lightning runs its hooks after every other callback's: the save
    at a batch end then holds that batch's update of the weight average (saved before it,
    the resumed run's average missed one step).
    A signal during a validation stops at its end: stopped in the middle (Lightning's
    default), the checkpoint held the averaged weights swapped in for validation as the
    trained ones, and the resumed run scored a part of the validation set.
    Until a training batch has finished there is nothing to save: SIGTERM and Ctrl-C stop at
    once (Lightning would run on through the sanity check, a first torch.compile and step).
    """

    def __init__(self, last_ckpt: Path) -> None:
        self.last_ckpt = Path(last_ckpt)
        self.received: int | None = None
        self.saved_step: int | None = None
        self.batches = 0  # training batches finished in this attempt
        self._previous: dict[int, object] = {}
        self.pending = False  # several ranks: a stop this rank saw, not yet agreed on
        self._ranks = 1
        self._rank_zero = True
        self._validating: L.Trainer | None = None  # set during a validation of the fit
        self._deferred = False  # a stop seen during that validation, for its end

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_term)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if signal.SIGTERM in self._previous:
            signal.signal(signal.SIGTERM, self._previous.pop(signal.SIGTERM))

    def _on_term(self, signum: int, frame) -> None:
        """Lightning's handler calls this one after its own: leave it the stop at the end of
        this batch, unless nothing would be saved there."""
        by_lightning = signal.getsignal(signal.SIGTERM) != self._on_term
        if not (by_lightning and (self.batches or self.received in PREEMPTION_SIGNALS)):
            raise Terminated
        if self._validating is not None:  # Lightning would stop after this validation batch
            self._validating._signal_connector.received_sigterm = False
            self._deferred = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        self._previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_interrupt)
        self._ranks = trainer.world_size
        self._rank_zero = trainer.is_global_zero
        if self._ranks > 1:
            # Lightning's SIGTERM handler broadcasts from inside the handler: a collective
            # wherever the signal lands, which deadlocks when another rank is in a different
            # one (seen: Ctrl-C under DDP with loader workers hung for good). Here a signal
            # only marks its rank, and the ranks agree at each batch end (_agree_to_stop).
            signal.signal(signal.SIGTERM, self._on_term_ranked)

    def _on_term_ranked(self, signum: int, frame) -> None:
        if not (self.batches or self.received in PREEMPTION_SIGNALS):
            raise Terminated  # nothing to save yet: stop at once, as on one process
        self.pending = True

    def _agree_to_stop(self, trainer: L.Trainer) -> None:
        """Every rank, at the same point of every batch: stop if any rank saw a signal, so
        all of them stop at this batch's end (Lightning checks received_sigterm there)."""
        flag = torch.tensor([float(self.pending)], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            trainer._signal_connector.received_sigterm = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if signal.SIGINT in self._previous and self.received != signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        log.warning("received %s: stopping after this batch (or validation)", name)
        self.received = signum
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's graceful stop at a batch boundary

    def _on_interrupt(self, signum: int, frame) -> None:
        """Ctrl-C: stop like SIGTERM, at the end of this batch, saving last.ckpt; a second
        Ctrl-C stops at once (Python's KeyboardInterrupt)."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not self.batches:
            raise KeyboardInterrupt  # nothing to save yet
        if self.received is None:
            if self._rank_zero:
                print(
                    "\nCtrl-C: stopping after this batch (or validation) and saving "
                    "checkpoints/last.ckpt (Ctrl-C again to stop at once, without saving)",
                    file=sys.stderr,
                    flush=True,
                )
            self.received = signal.SIGINT
            os.kill(os.getpid(), signal.SIGTERM)

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (not by SIGTERM or a preemption signal)."""
        return self.received == signal.SIGINT

    def _save(self, trainer: L.Trainer) -> None:
        if self.saved_step != trainer.global_step and trainer.global_step > 0:
            trainer.save_checkpoint(self.last_ckpt, weights_only=False)
            self.saved_step = trainer.global_step
            if trainer.is_global_zero:
                log.warning("saved %s at step %d", self.last_ckpt, trainer.global_step)

    def _save_if_stopping(self, trainer: L.Trainer) -> None:
        if trainer.received_sigterm and not trainer.sanity_checking:
            self._save(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self.batches += 1
        if self._ranks > 1:
            self._agree_to_stop(trainer)
        self._save_if_stopping(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_if_stopping(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validating = trainer

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validating = None
        if self._deferred:  # Lightning stops after this validation
            trainer._signal_connector.received_sigterm = True
            self._deferred = False
        if trainer.state.fn == "fit":
            self._save_if_stopping(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        self.on_fit_end(trainer, pl_module)
        if not isinstance(exception, SIGTERMException):
            return
        self._save(trainer)  # a no-op when a checkpoint point above already saved this step
        if self.received in (None, signal.SIGINT):
            return  # a plain SIGTERM or Ctrl-C: the caller reports it and exits
        previous = self._previous.get(self.received)
        if callable(previous):  # submitit's handler: requeue this job, then exit
            previous(self.received, None)
        elif trainer.is_global_zero and slurm_job_id():
            job = slurm_job_id()
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode == 0:
                log.warning("requeued SLURM job %s", job)
            else:
                log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())


class DDPWorkerWatch(L.Callback):
    """On rank 0 of a single-node DDP run: if another rank's process dies, say which one in
    one line and stop every rank at once, instead of waiting in a collective.

    Lightning starts ranks 1..N-1 as child processes of rank 0, and its observer kills
    everything, without a word, up to 5 s after one of them fails. This watcher takes the
    observer's place: it polls every 50 ms, prints the error, kills the other ranks and
    exits with code 1. Checkpoints are written atomically, so `last_ckpt`, if there is one
    yet, is whole: the error says whether `ckpt_path=last` resumes, or there is nothing to
    resume.
    """

    MARKER = "train_ddp_process_"  # in the command line Lightning gives each child rank

    def __init__(
        self, last_ckpt: Path | None = None, period_s: float = 0.05, grace_s: float = 2.0
    ) -> None:
        self.last_ckpt = None if last_ckpt is None else Path(last_ckpt)
        self.period_s = period_s
        self.grace_s = grace_s
        self.stop_grace_s = 60.0
        self._stopped: dict[int, float] = {}  # pid -> when it was seen stopped by a signal
        self._ranks: dict[int, int] = {}  # pid -> local rank, of the children still running
        # pid -> Lightning's Popen of that child: its observer thread reaps the child too
        # (Popen.poll), and then only the Popen knows how it ended
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()  # the watcher thread and on_exception both poll
        self._stop = threading.Event()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1 and trainer.global_rank == 0:
            self._ranks = ddp_children(os.getpid(), self.MARKER)
            launched = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
            self._procs = {proc.pid: proc for proc in launched if proc.pid in self._ranks}
            if self._ranks:  # one watcher per stage (fit, then test)
                silence_lightning_observers()
                self.start_watching()

    def start_watching(self) -> None:
        """Poll the ranks in `_ranks` from a daemon thread until teardown."""
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="ddp-worker-watch").start()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop.set()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        """A dead rank often shows first as a connection error in rank 0's collective: give
        the dead process a moment to be seen, so that the error names it. If the watcher
        thread is reporting it already, wait for it (it holds the lock until it exits the
        process): returning would let rank 0 exit first, with the connection error."""
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            self._poll()
            with self._lock:
                if not self._ranks:
                    return
            time.sleep(self.period_s)

    def _watch(self) -> None:
        while not self._stop.wait(self.period_s):
            self._poll()

    def _poll(self) -> None:
        with self._lock:
            for pid, rank in list(self._ranks.items()):
                code = self._exit_code(pid)
                if code is None:
                    continue
                if code in STOP_CODES:
                    # stopped by a signal at an agreed batch end, as this rank is about to:
                    # not a crash, unless this rank is still running well after it
                    seen = self._stopped.setdefault(pid, time.monotonic())
                    if time.monotonic() - seen < self.stop_grace_s:
                        continue
                self._ranks.pop(pid, None)
                if code != 0:
                    self._fail(rank, pid, code, self._ranks)

    def _exit_code(self, pid: int) -> int | None:
        """How the child ended (negative: the signal), or None while it runs."""
        proc = self._procs.get(pid)
        if proc is not None:  # whoever reaped it, Lightning's observer or we, set returncode
            return proc.poll()
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (any more): nothing to say of it
            return 0
        return os.waitstatus_to_exitcode(status) if done else None

    def _fail(self, rank: int, pid: int, code: int, others: dict[int, int]) -> None:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        print(
            f"error: DDP rank {rank} (pid {pid}) died ({how}); stopped every rank. "
            + self._what_to_do(),
            file=sys.stderr,
            flush=True,
        )
        for other in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(other, signal.SIGKILL)
        os._exit(1)

    def _what_to_do(self) -> str:
        if self.last_ckpt is None:
            return "Checkpoints are written whole: resume with ckpt_path=last if one was written"
        if not checkpoint_exists(self.last_ckpt):
            return "No checkpoint was written yet: start the run again"
        # memory-mapped, or a sharded checkpoint's meta.pt: the weights are not read
        path = self.last_ckpt / SHARDED_META if is_sharded(self.last_ckpt) else self.last_ckpt
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            step = f", step {int(saved['global_step'])}"
        except Exception:  # noqa: BLE001 - the step is a detail; the advice stands without it
            step = ""
        return f"The last checkpoint is whole: resume with ckpt_path=last ({self.last_ckpt}{step})"


class StaleBestCleanup(L.Callback):
    """On a resumed fit, delete the best-*.ckpt that the restored ModelCheckpoint does not
    know: written by the interrupted run after its last.ckpt, from steps that the resumed
    run trains again, they would stay beside the new best forever (ModelCheckpoint deletes
    only the files it knows of)."""

    def __init__(self, checkpoints_dir: Path) -> None:
        self.checkpoints_dir = Path(checkpoints_dir)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning restored the callbacks' state before this hook
        if trainer.ckpt_path is None or not trainer.is_global_zero:
            return
        known = {
            Path(cb.best_model_path).name
            for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.best_model_path
        }  # by name: a run directory moved since keeps its best
        stale = sorted(p for p in self.checkpoints_dir.glob("best-*.ckpt") if p.name not in known)
        for path in stale:
            remove_path(path)
        if stale:
            log.info(
                "removed %s: written after %s by the interrupted run",
                ", ".join(p.name for p in stale),
                Path(trainer.ckpt_path).name,
            )


class SignalDeadline(L.Callback):
    """In a multi-process run, exit 143 with one line if the process still runs `timeout_s`
    (the DDP timeout) after a SIGTERM, killing the DDP ranks it started (as DDPWorkerWatch).

    Lightning stops on SIGTERM at a batch boundary, and Python runs signal handlers only
    between bytecodes: a rank blocked inside a collective that will not finish reaches
    neither, and would outlive the signal for as long as the collective hangs. So SIGTERM
    is noticed beside Python's handlers: the interpreter's C-level handler writes each
    signal's number to the wakeup fd (`signal.set_wakeup_fd`), which a daemon thread reads.
    Lightning's handler stays as it is, and so does the graceful stop.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.rank = 0
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._forward = -1  # a wakeup fd that was there before: it gets every byte too
        self._timer: threading.Timer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            self.install(trainer.global_rank)

    def install(self, rank: int) -> None:
        if self._pair or threading.current_thread() is not threading.main_thread():
            return  # once per process; the wakeup fd is set from the main thread only
        self.rank = rank
        self._pair = socket.socketpair()
        self._pair[1].setblocking(False)
        self._forward = signal.set_wakeup_fd(self._pair[1].fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, daemon=True, name="sigterm-deadline").start()

    def _watch(self) -> None:
        while data := self._pair[0].recv(512):
            if self._forward != -1:
                with contextlib.suppress(OSError):
                    os.write(self._forward, data)
            if int(signal.SIGTERM) in data and self._timer is None:
                self._timer = threading.Timer(self.timeout_s, self._expire)
                self._timer.daemon = True
                self._timer.start()

    def _expire(self) -> None:
        print(
            f"error: rank {self.rank} still blocked {self.timeout_s:g}s after SIGTERM (a "
            "collective that will not finish); exiting",
            file=sys.stderr,
            flush=True,
        )
        for pid in ddp_children(os.getpid(), DDPWorkerWatch.MARKER):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os._exit(143)


def silence_lightning_observers() -> None:
    """Stop Lightning's child-process observer: it polls every 5 s and, when a rank has
    died, SIGKILLs rank 0 without a word. When its poll comes first it would also take the
    dead rank's exit status from the watch, which could then not name it. The watch does
    the observer's job (kill the other ranks, stop rank 0), sooner and with the error line."""
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver):
            thread._child_processes = []  # its next poll finds nothing running and it ends


def ddp_children(parent: int, marker: str) -> dict[int, int]:
    """{pid: local rank} of the child processes of `parent` whose command line has `marker`
    followed by the rank (Linux /proc; empty elsewhere)."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and marker in cmdline:
            rank = cmdline.split(marker, 1)[1].split("\0")[0]
            found[int(entry.name)] = int(rank) if rank.isdigit() else -1
    return found
