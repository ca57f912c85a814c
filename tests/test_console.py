"""What a person sees: the quickstart's console shows the run directory, the model and the
data in a line each, a step/max_steps progress bar, the metrics and the result, and none of
the libraries' chatter, which goes to train.log instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_train import TINY

NOISE = ("litlogger", "srun", "LeafSpec", "Total FLOPs", "/-2", "v_num", "GPU available")


def test_the_quickstart_console_shows_what_matters(tmp_path: Path):
    run_dir = tmp_path / "run"
    args = ["+experiment=quickstart_pretrain", *TINY, "trainer.progress_bar=true"]
    out = subprocess.run(
        [sys.executable, "-m", "vitexp.train", *args, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    console = out.stdout + out.stderr
    for text in NOISE:
        assert text not in console, (text, console[-3000:])
    lines = console.splitlines()
    assert f"run: {run_dir}" in lines
    assert any(line.startswith("model: vit_tiny_p8 (") and "parameters" in line for line in lines)
    assert "data: shapes, 8 classes, pretrain" in lines
    assert "step 4/4 (epoch 0)" in console  # the progress bar counts steps, not epochs
    assert any(line.startswith("step 4 (epoch 0): ") and "val/acc" in line for line in lines)
    assert "pretrain on shapes: test accuracy" in console
    log = (run_dir / "train.log").read_text()  # nothing lost: the chatter is kept here
    assert "GPU available" in log and "litlogger" in log and "LeafSpec" in log
    assert f"run: {run_dir}" in log
