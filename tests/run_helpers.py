"""Short real training runs as subprocesses: the runs that resume and fault tests kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RUN = [
    "data=shapes",
    "data.num_classes=8",
    "data.shapes.num_train=160",  # 10 batches per epoch: the run crosses epochs
    "data.shapes.num_val=32",
    "data.shapes.num_test=64",
    "data.batch_size=16",
    "data.num_workers=2",
    "model.depth=2",
    "model.embed_dim=32",
    "model.drop_rate=0.1",  # dropout and stochastic depth: the RNG state must resume too
    "model.drop_path_rate=0.1",
    "trainer.max_steps=24",
    "trainer.max_epochs=null",
    "trainer.val_check_interval=5",
    "trainer.check_val_every_n_epoch=null",
    "trainer.checkpoint_every_n_steps=3",
    "trainer.progress_bar=false",
    "schedule.warmup_steps=4",
    "figures=false",
    # the recipes whose state must resume too: a weight average, RandAugment, MixUp/CutMix
    "ema.decay=0.9",
    "ema.warmup=true",
    "data.augment.randaugment.num_ops=2",
    "data.augment.mixup_alpha=0.8",
    "data.augment.cutmix_alpha=1.0",
]


def start(run_dir: Path, *extra: str, new_session: bool = False) -> subprocess.Popen:
    """The run in its own process group with `new_session` (a terminal's Ctrl-C reaches the
    whole group: os.killpg)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vitexp.train", *RUN, f"hydra.run.dir={run_dir}", *extra],
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def wait_for_checkpoint(run_dir: Path, after_step: int, timeout: float = 120) -> None:
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if last.is_file():
            try:
                if torch.load(last, weights_only=True)["global_step"] >= after_step:
                    return
            except Exception:  # noqa: BLE001 - being replaced right now; look again
                pass
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint after step {after_step} in {run_dir}")
