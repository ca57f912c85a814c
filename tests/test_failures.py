"""Faults during a run: a kill while a checkpoint is being written, a diverging loss, a
dead DDP worker. Each ends with a clear message and nothing good lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from run_helpers import RUN, finish, results, start, wait_for_checkpoint
from test_cli_errors import cli_env
from test_train import train
from vitexp.errors import Diverged
from vitexp.training.callbacks import DDPWorkerWatch, ddp_children
from vitexp.training.checkpoint import AtomicCheckpointIO
from vitexp.training.module import ViTModule

REPO = Path(__file__).resolve().parents[1]

# Writes checkpoints 0, 1, 2, ... (each a 64 MB tensor filled with its number) to one path,
# slowly, through the writer every vitexp run uses.
WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from vitexp.training.checkpoint import AtomicCheckpointIO
    real_save = torch.save
    def slow_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        time.sleep(0.3)  # a slow shared filesystem: the kill lands mid-write
    torch.save = slow_save
    io = AtomicCheckpointIO()
    for i in range(1000):
        io.save_checkpoint({"step": i, "w": torch.full((16 * 2**20,), float(i))}, sys.argv[1])
    """
)


@pytest.mark.parametrize("delay", [0.0, 0.15])
def test_kill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path: Path, delay: float):
    target = tmp_path / "ckpts" / "last.ckpt"
    partial = target.with_name(".last.ckpt.partial")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=REPO)
    try:
        deadline = time.time() + 120
        while not (target.exists() and partial.exists()):  # a save after the first one
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    checkpoint = torch.load(target, weights_only=True)
    assert checkpoint["w"].numel() == 16 * 2**20
    assert bool((checkpoint["w"] == checkpoint["step"]).all())  # one whole checkpoint
    # the next save replaces the leftover partial file and the target atomically
    AtomicCheckpointIO().save_checkpoint({"step": -1}, target)
    assert torch.load(target, weights_only=True) == {"step": -1}
    assert not partial.exists()


def test_atomic_writer_leaves_no_partial_file_on_error(tmp_path: Path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises for an unpicklable
        AtomicCheckpointIO().save_checkpoint({"step": 2, "bad": lambda: 0}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_ctrl_c_while_writing_a_checkpoint_stays_a_ctrl_c(tmp_path: Path, monkeypatch):
    """A second Ctrl-C can land inside torch.save; torch's zip writer then fails on closing
    ("unexpected pos", seen in CI) and must not turn the stop into a crash (exit 1)."""
    import io

    from vitexp.training import checkpoint

    class InterruptedFile(io.FileIO):
        def write(self, data):
            if self.tell() > 1000:
                raise KeyboardInterrupt
            return super().write(data)

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    monkeypatch.setattr(checkpoint, "open", InterruptedFile, raising=False)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.randn(4096)}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}  # the previous one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize(
    ("log_every", "bad_step", "ckpt_every", "last_good"),
    [(1, 3, 2, 2), (10, 5, 4, 4)],  # checked every step; checked only when saving (step 8)
)
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch, log_every, bad_step, ckpt_every, last_good
):
    real_loss = ViTModule.loss_fn

    def loss_going_nan(self, logits, labels):
        loss = real_loss(self, logits, labels)
        return loss * float("nan") if self.training and self.global_step == bad_step else loss

    monkeypatch.setattr(ViTModule, "loss_fn", loss_going_nan)
    run_dir = tmp_path / "nan"
    match = rf"training loss is nan at step {bad_step} \(epoch 0\)"
    with pytest.raises(Diverged, match=match) as err:
        train(
            run_dir,
            f"trainer.checkpoint_every_n_steps={ckpt_every}",
            f"trainer.log_every_n_steps={log_every}",
            "trainer.val_check_interval=100",
            "trainer.max_steps=9",
        )
    assert err.value.exit_code == 3
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == last_good  # saved before the bad step; never after it
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert not (run_dir / "results.json").exists()


@pytest.mark.parametrize("full_error", [False, True], ids=["plain", "full"])
def test_nan_from_the_command_line_is_one_line_and_exit_3(tmp_path: Path, full_error: bool):
    """Exit 3 with HYDRA_FULL_ERROR=1 too (it adds the traceback): scripts read the code."""
    result = subprocess.run(
        [sys.executable, "-m", "vitexp.train", *RUN, f"hydra.run.dir={tmp_path / 'run'}",
         "optim.lr=1e30", "schedule.warmup_steps=0"],
        cwd=tmp_path, env=cli_env(full_error), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: training loss is ") and "at step" in lines[-1]
    assert "lower optim.lr" in lines[-1]
    assert ("Traceback" in result.stderr) == full_error


SLOW_SAVE_TRAIN = textwrap.dedent(
    """
    import sys, time, torch
    real_save = torch.save
    def slow_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if getattr(f, "name", "").endswith(".partial"):
            time.sleep(0.5)  # a slow filesystem: the kill below lands during the write
    torch.save = slow_save
    from vitexp.train import main
    sys.argv = ["vitexp.train", *sys.argv[1:]]
    main()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("nth_save", [2, 5])
def test_sigkill_during_a_checkpoint_save_then_resume_matches(
    tmp_path: Path, nth_save: int, uninterrupted: dict
):
    run_dir = tmp_path / "killed"
    partial = run_dir / "checkpoints" / ".last.ckpt.partial"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE_TRAIN, *RUN, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seen, was_present = 0, False
    deadline = time.time() + 240
    while seen < nth_save:
        assert time.time() < deadline and proc.poll() is None, "the run ended first"
        present = partial.exists()
        seen += present and not was_present
        was_present = present
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # in the middle of writing save number `nth_save`
    proc.wait()
    assert partial.exists()  # it really died while saving
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] > 0
    finish(start(run_dir, "ckpt_path=last"))
    resumed = results(run_dir)
    assert resumed["steps"] == uninterrupted["steps"] == 24
    for key, value in uninterrupted["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("checkpointed", [True, False], ids=["after-ckpt", "before-ckpt"])
def test_ddp_worker_death_fails_in_bounded_time(tmp_path: Path, checkpointed: bool):
    """Kill one of two DDP processes mid-run: the run must end, non-zero, with one line that
    offers ckpt_path=last only if there is a checkpoint to resume."""
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # before-ckpt: no save every n steps and no validation (which saves) in the 400 steps
    no_ckpt = ["trainer.checkpoint_every_n_steps=null", "trainer.val_check_interval=1000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitexp.train", *RUN, f"hydra.run.dir={run_dir}",
         "trainer=ddp", "trainer.devices=2", "trainer.max_steps=400",
         "trainer.ddp_timeout_s=30", "data.num_workers=0", *([] if checkpointed else no_ckpt)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 180
    workers: list[int] = []  # rank 1, a child process of rank 0
    while not workers:
        assert time.time() < deadline and proc.poll() is None
        workers = list(ddp_children(proc.pid, DDPWorkerWatch.MARKER))
        time.sleep(0.2)
    if checkpointed:
        wait_for_checkpoint(run_dir, 1)
    else:  # into training: the logger's hparams.yaml comes after the callbacks' setup (the
        # watch), which under load takes longer than any fixed wait
        while not list(run_dir.glob("logs/version_*/hparams.yaml")):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.2)
        time.sleep(2)
    start_kill = time.time()
    os.kill(workers[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=150)
    elapsed = time.time() - start_kill
    assert proc.returncode != 0
    assert elapsed < 120, f"took {elapsed:.0f} s to fail"
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: DDP rank 1 (pid ") and "killed by SIGKILL" in last, err[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists() == checkpointed
    if checkpointed:
        assert f"resume with ckpt_path=last ({ckpt}, step " in last, last
    else:
        assert "ckpt_path=last" not in last and "No checkpoint was written yet" in last, last


class Exited(Exception):
    """What os._exit raises in the tests below, so that the message can be read."""


@pytest.mark.parametrize("saved", ["none", "file", "sharded"])
def test_ddp_worker_death_offers_to_resume_only_from_a_checkpoint(
    tmp_path: Path, monkeypatch, capsys, saved: str
):
    last = tmp_path / "checkpoints" / "last.ckpt"
    if saved == "file":
        AtomicCheckpointIO().save_checkpoint({"global_step": 7, "w": torch.zeros(4)}, last)
    elif saved == "sharded":  # a directory: Lightning's meta.pt beside the shards
        last.mkdir(parents=True)
        torch.save({"global_step": 7}, last / "meta.pt")

    def exit_(code):
        raise Exited(code)

    monkeypatch.setattr(os, "_exit", exit_)
    with pytest.raises(Exited):
        DDPWorkerWatch(last)._fail(1, 4321, -signal.SIGKILL, {})
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: DDP rank 1 (pid 4321) died (killed by SIGKILL); stopped")
    if saved == "none":
        assert line.endswith("No checkpoint was written yet: start the run again")
        assert "ckpt_path=last" not in line
    else:
        assert line.endswith(f"resume with ckpt_path=last ({last}, step 7)")


# rank 0 of a pretend DDP run: a child process that Lightning would have started as rank 1
# (its command line has the marker), and a watch of it; the tests below kill the child
RANK0_WATCHING_RANK1 = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from vitexp.training.callbacks import DDPWorkerWatch, ddp_children
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              DDPWorkerWatch.MARKER + "1"])
    time.sleep(0.5)
    watch = DDPWorkerWatch()
    watch._ranks = ddp_children(os.getpid(), DDPWorkerWatch.MARKER)
    assert watch._ranks == {child.pid: 1}, watch._ranks
    """
)

RANK0_SEES_A_CONNECTION_ERROR = RANK0_WATCHING_RANK1 + textwrap.dedent(
    """
    child.send_signal(signal.SIGKILL)
    # what rank 0 sees first when a peer dies: gloo's read error in a collective
    watch.on_exception(None, None, RuntimeError("gloo: Read error: Connection reset by peer"))
    print("on_exception returned", file=sys.stderr)
    """
)

RANK0_FAILS_WHILE_THE_WATCHER_REPORTS = RANK0_WATCHING_RANK1 + textwrap.dedent(
    """
    what_to_do = watch._what_to_do
    def slow_what_to_do():  # reading last.ckpt's step takes a while
        time.sleep(1.0)
        return what_to_do()
    watch._what_to_do = slow_what_to_do
    watch.start_watching()
    child.send_signal(signal.SIGKILL)
    time.sleep(0.4)  # the watcher has seen the death and is writing its line
    watch.on_exception(None, None, RuntimeError("gloo: Connection closed by peer"))
    print("on_exception returned", file=sys.stderr)
    """
)


def rank0_names_the_dead_rank(script: str) -> None:
    """`script` exits 1 with the watch's line last, before `on_exception` could return."""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "on_exception returned" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: DDP rank 1 (pid ") and "killed by SIGKILL" in last


def test_a_collective_error_from_a_dead_rank_names_the_rank():
    """The race of test_ddp_worker_death_fails_in_bounded_time, made certain: the connection
    error arrives before the watcher's poll; `on_exception` still finds the dead rank and
    says so."""
    rank0_names_the_dead_rank(RANK0_SEES_A_CONNECTION_ERROR)


def test_rank0_waits_for_the_watcher_that_is_naming_the_dead_rank():
    """The watcher found the dead rank first and is still writing its line when the
    connection error reaches rank 0: rank 0 must not exit before the line is out."""
    rank0_names_the_dead_rank(RANK0_FAILS_WHILE_THE_WATCHER_REPORTS)


def test_a_rank_reaped_by_lightnings_observer_is_still_named(monkeypatch):
    """Lightning's observer reaps a dead rank with Popen.poll, and a later waitpid finds no
    child: the watch reads how it ended from the same Popen, and Lightning's observer, which
    would SIGKILL rank 0 without a word, is stopped once the watch runs."""
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", DDPWorkerWatch.MARKER + "1"]
    )
    observer = _ChildProcessObserver(os.getpid(), [child], sleep_period=3600)
    observer.start()  # sleeps: only its list is read below
    watch = DDPWorkerWatch()
    watch._ranks, watch._procs = {child.pid: 1}, {child.pid: child}
    failed = []
    monkeypatch.setattr(watch, "_fail", lambda *args: failed.append(args[:3]))
    watch._poll()
    assert failed == [] and watch._ranks == {child.pid: 1}  # running: nothing to say
    child.kill()
    child.wait()  # what the observer's poll does: the child is reaped, its status is in child
    watch._poll()
    assert failed == [(1, child.pid, -signal.SIGKILL)]
    assert watch._ranks == {}

    from vitexp.training.callbacks import silence_lightning_observers

    silence_lightning_observers()
    assert observer._child_processes == []
