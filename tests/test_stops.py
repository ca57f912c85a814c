"""Ctrl-C or SIGTERM at any moment of a compiled run (data setup, the first torch.compile, the
first validation, training) and a damaged compile cache: exit 130 / 143 / 1, ONE line that
says what was kept, and no run directory when nothing of value was written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitexp.errors import Interrupted
from vitexp.training.stopping import CompileCacheError, as_stop, damaged_compile_cache

pytestmark = pytest.mark.slow

TINY = [
    "data=shapes",
    "data.num_classes=4",
    "data.shapes.num_train=64",
    "data.shapes.num_val=32",
    "data.shapes.num_test=16",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.depth=1",
    "model.embed_dim=32",
    "trainer.max_steps=6",
    "trainer.max_epochs=null",
    "trainer.val_check_interval=2",
    "trainer.check_val_every_n_epoch=null",
    "trainer.progress_bar=false",
    "trainer.compile=true",
    "fewshot.enabled=false",
    "figures=false",
]

# vitexp.train with a pause at one point of the run, announced by touching a marker file:
# the test's signal lands inside that pause (the stops before a step finished break it)
PAUSED = """
import sys, time
from pathlib import Path

phase, marker = sys.argv[1], Path(sys.argv[2])
sys.argv = ["vitexp.train", *sys.argv[3:]]


def pause(seconds=60):
    marker.touch()
    time.sleep(seconds)


def before(owner, name, when=lambda *a, **k: True, seconds=60):
    real = getattr(owner, name)

    def paused(*args, **kwargs):
        if not marker.exists() and when(*args, **kwargs):
            pause(seconds)
        return real(*args, **kwargs)

    setattr(owner, name, paused)


if phase == "setup":  # reading the data's splits
    import vitexp.training.steps
    before(vitexp.training.steps, "check_data")
elif phase == "compile":  # inside the first torch.compile (Inductor's entry)
    import torch._inductor.compile_fx
    before(torch._inductor.compile_fx, "compile_fx")
elif phase == "validation":  # the first validation (Lightning's sanity check)
    from vitexp.training.module import ViTModule
    before(ViTModule, "validation_step")
elif phase == "training":  # a training step after step 2 (and its checkpoint)
    from vitexp.training.module import ViTModule
    before(ViTModule, "training_step", lambda self, *a: self.global_step >= 3, seconds=2)

from vitexp.train import main
main()
"""


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory) -> Path:
    """A private compile cache for the runs of this module (warm after the first compile)."""
    return tmp_path_factory.mktemp("inductor")


def start(run_dir: Path, phase: str, cache: Path) -> subprocess.Popen:
    marker = run_dir.parent / "paused"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-c", PAUSED, phase, str(marker), *TINY, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C reaches the process group, as from a terminal
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"never reached {path.name}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.05)


NOTHING = {
    signal.SIGINT: "error: interrupted (Ctrl-C): nothing to resume: no step finished",
    signal.SIGTERM: "error: stopped by a signal: nothing to resume: no step finished",
}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
@pytest.mark.parametrize("phase", ["setup", "compile", "validation", "training"])
def test_a_signal_at_any_moment_is_one_line_and_keeps_only_what_has_value(
    tmp_path: Path, inductor_cache: Path, phase: str, sig: signal.Signals
):
    run_dir = tmp_path / "runs" / "run"
    (tmp_path / "runs").mkdir()
    proc = start(run_dir, phase, inductor_cache)
    wait_for(tmp_path / "runs" / "paused", proc)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
    else:
        proc.send_signal(signal.SIGTERM)  # kill PID, a scheduler
    out, _ = proc.communicate(timeout=240)
    lines = out.strip().splitlines()
    assert proc.returncode == 128 + sig, out[-3000:]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    if phase != "training":
        assert lines[-1] == NOTHING[sig], out[-3000:]
        assert not run_dir.exists()
        return
    how = "interrupted \\(Ctrl-C\\)" if sig == signal.SIGINT else "stopped by a signal"
    last = run_dir / "checkpoints" / "last.ckpt"
    pattern = rf"error: {how} at step (\d+); {last} holds that step: resume with ckpt_path=last"
    match = re.match(pattern, lines[-1])
    assert match, lines[-1]
    assert torch.load(last, weights_only=True)["global_step"] == int(match.group(1)) >= 3
    assert lines[-1].removeprefix("error: ") in (run_dir / "train.log").read_text()


def test_a_damaged_compile_cache_names_its_folder_and_the_fix(tmp_path: Path):
    """The case seen: a compiled kernel (.so) in Inductor's cache left empty by a compile that
    was killed; the next run's torch.compile fails to load it ('file too short')."""
    cache = tmp_path / "inductor"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    train = [sys.executable, "-m", "vitexp.train", *TINY, "trainer.max_steps=2"]
    first = subprocess.run(
        [*train, "hydra.run.dir=first"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "No CUDA runtime" not in first.stdout + first.stderr  # torch's notice: train.log only
    kernels = list(cache.rglob("*.so"))
    assert kernels
    for so in kernels:
        so.write_bytes(b"")
    second = subprocess.run(
        [*train, "hydra.run.dir=second"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert second.returncode == 1, second.stderr[-3000:]
    lines = (second.stdout + second.stderr).strip().splitlines()
    assert lines[-1] == (
        f"error: torch.compile could not load a file of its cache {cache}, damaged (e.g. by a "
        f"compile that was interrupted): remove that folder (rm -rf {cache}) or set "
        "trainer.compile=false, and run again; nothing to resume: no step finished"
    ), "\n".join(lines[-5:])
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert not (tmp_path / "second").exists()


def test_the_damaged_cache_is_told_from_other_compile_errors(tmp_path: Path, monkeypatch):
    import torch._inductor  # noqa: F401 - as after a torch.compile

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    so = f"{tmp_path}/qm/cqmuk75zz.main.so"
    cut = ImportError(f"{so}: file too short")
    inductor = RuntimeError(f"backend='inductor' raised:\nImportError: {so}: file too short")
    inductor.inner_exception = cut
    assert damaged_compile_cache(inductor) == str(tmp_path)
    assert damaged_compile_cache(ImportError(f"{so}: cannot read file data")) == str(tmp_path)
    assert damaged_compile_cache(ImportError("/usr/lib/libcuda.so.1: cannot open")) is None
    assert damaged_compile_cache(RuntimeError("backend='inductor' raised: shapes")) is None
    stop = as_stop(inductor, None, None)
    assert isinstance(stop, CompileCacheError) and stop.exit_code == 1
    assert f"rm -rf {tmp_path})" in str(stop) and "trainer.compile=false" in str(stop)


def test_what_a_stop_says_it_kept(tmp_path: Path):
    (tmp_path / "checkpoints").mkdir()
    ctrl_c = as_stop(KeyboardInterrupt(), tmp_path, None)
    assert isinstance(ctrl_c, Interrupted) and ctrl_c.exit_code == 130
    assert str(ctrl_c) == "interrupted (Ctrl-C): nothing to resume: no step finished"
    torch.save({"global_step": 4}, tmp_path / "checkpoints" / "last.ckpt")
    lightning_exit = SystemExit(1)
    lightning_exit.__context__ = KeyboardInterrupt()
    trainer = type("T", (), {"global_step": 6, "callbacks": []})()
    stop = as_stop(lightning_exit, tmp_path, trainer)
    assert str(stop) == (
        f"interrupted (Ctrl-C) at step 6; {tmp_path}/checkpoints/last.ckpt holds step 4: "
        "resume with ckpt_path=last"
    )
    assert str(as_stop(KeyboardInterrupt(), None, None, resuming="last")) == (
        "interrupted (Ctrl-C): nothing written: resume as before, with ckpt_path=last"
    )
    assert as_stop(SystemExit(1), tmp_path, trainer) is None  # not a signal
    assert as_stop(ValueError("x"), tmp_path, trainer) is None


DDP = [
    *(o for o in TINY if not o.startswith(("trainer.compile", "trainer.max_steps"))),
    "trainer.max_steps=100000",
    "data.shapes.num_train=1024",
    "data.num_workers=1",  # the case that hung: a loader worker per rank
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
]


@pytest.mark.parametrize("how", ["ctrl_c_every_rank", "sigterm_rank_0_only"])
def test_a_signal_under_ddp_stops_every_rank_at_one_step_with_one_line(tmp_path: Path, how: str):
    """Lightning's SIGTERM handler broadcasts from inside the handler; with the ranks at
    different collectives that deadlocked (Ctrl-C under DDP with loader workers never
    returned). vitexp's handler only marks the rank; the ranks agree at each batch end."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitexp.train", *DDP, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log = run_dir / "train.log"
    deadline = time.time() + 240
    while not (log.is_file() and log.read_text().count(" INFO step ") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    sig = signal.SIGINT if how == "ctrl_c_every_rank" else signal.SIGTERM
    if how == "ctrl_c_every_rank":
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches every rank
    else:
        proc.send_signal(signal.SIGTERM)  # kill PID: rank 0 alone
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the ranks deadlocked: no exit 120 s after the signal") from None
    lines = out.strip().splitlines()
    assert proc.returncode == 128 + sig, out[-3000:]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], out[-3000:]
    assert "died" not in out and "Traceback" not in out, out[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    match = re.match(rf"error: .* at step (\d+); {last} holds that step", lines[-1])
    assert match, lines[-1]
    assert torch.load(last, weights_only=True)["global_step"] == int(match.group(1))
    deadline = time.time() + 30  # no rank or loader worker left behind, once they exit
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("a rank or loader worker outlived the run by 30 s")
