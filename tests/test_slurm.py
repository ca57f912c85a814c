"""The SLURM path on a real one-machine cluster (scripts/slurm_local.sh): a sweep through the
submitit launcher, and jobs requeued by `scontrol requeue` or signalled for preemption that
resume and finish with the same number of steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]
TINY = [
    "data=shapes",
    "data.num_classes=8",
    "data.shapes.num_val=32",
    "data.shapes.num_test=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.depth=1",
    "model.embed_dim=32",
    "trainer.max_epochs=null",
    "trainer.check_val_every_n_epoch=null",
    "trainer.progress_bar=false",
    "fewshot.shots=[1,5]",
    "fewshot.report_shot=5",
    "fewshot.draws=1",
    "figures=false",
    "hydra/launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=20",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Start the cluster for these tests; stop only what the script started."""
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("starting SLURM daemons needs root")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state)}
    script = REPO / "scripts" / "slurm_local.sh"
    subprocess.run([script, "start"], env=env, check=True, timeout=900)
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield state
    subprocess.run([script, "stop"], env=env, check=False, timeout=120)
    os.environ.pop("SLURM_CONF", None)


def sweep(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vitexp.train",
            "-m",
            *TINY,
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"output_root={tmp_path}",
            *overrides,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def squeue_ids() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def wait_for_step(ckpt: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if torch.load(ckpt, weights_only=True)["global_step"] >= step:
                return
        except Exception:  # noqa: BLE001 - not there yet, or being replaced
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{ckpt} did not reach step {step}")


def test_two_cell_sweep_through_the_slurm_launcher(cluster, tmp_path: Path):
    finish(
        sweep(
            tmp_path,
            "model.pos_embed.kind=none,learned_2d",
            "data.shapes.num_train=128",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
        )
    )
    records = [
        json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))
    ]
    assert [r["pos_embed"]["kind"] for r in records] == ["none", "learned_2d"]
    for r in records:
        assert r["status"] == "done" and r["steps"] == 6 and r["slurm_job_id"]
        assert set(r["fewshot"]) == {"digits/1shot", "digits/5shot"}


@pytest.mark.parametrize("how", ["scontrol_requeue", "preemption_signal"])
def test_requeued_job_resumes_and_finishes(cluster, tmp_path: Path, how: str):
    """`scontrol requeue` (SIGTERM, then the job goes back to the queue) and submitit's
    preemption signal (SIGUSR2: checkpoint, requeue) both end in a finished run of the
    same number of steps, resumed from a checkpoint in the same job directory."""
    proc = sweep(
        tmp_path,
        "data.shapes.num_train=256",
        "trainer.max_steps=120",
        "trainer.val_check_interval=40",
        "trainer.checkpoint_every_n_steps=10",
    )
    job_dir = tmp_path / "sweep" / "0"
    wait_for_step(job_dir / "checkpoints" / "last.ckpt", 20)
    (job_id,) = squeue_ids()
    if how == "scontrol_requeue":
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    else:
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    out = finish(proc)
    result = json.loads((job_dir / "results.json").read_text())
    assert result["steps"] == 120, out[-3000:]
    assert result["slurm_restarts"] >= 1 and result["resumed_at_step"] >= 20
    assert result["resumed_from"] == str(job_dir / "checkpoints" / "last.ckpt")
    assert (job_dir / "config.resume.yaml").is_file()
