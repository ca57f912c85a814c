"""`pretrained=` means the same for every command: a checkpoint file, a run directory or a
directory of runs (vitexp.training.checkpoint.resolve_pretrained), and an existing path that holds
none of them is named as such, never as missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitexp.errors import CheckpointError
from vitexp.training.checkpoint import resolve_pretrained

pytestmark = pytest.mark.slow


def command(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.fixture
def run_dir(uninterrupted: dict, tmp_path: Path) -> Path:
    """A copy of the session's finished tiny run (conftest.uninterrupted): the commands'
    default outputs go into it."""
    copy = tmp_path / "runs" / "run"
    shutil.copytree(uninterrupted["run_dir"], copy)
    return copy


def test_every_command_takes_a_run_directory(run_dir: Path, tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"img{i}.png")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    given = f"pretrained={run_dir}"

    predict = command("vitexp.predict", given, f"images={images}", "out=p.csv", cwd=tmp_path)
    assert predict.returncode == 0, predict.stderr[-2000:]
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 3  # header + 3 images

    export = command("vitexp.export", given, f"out={tmp_path / 'exported'}", cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-2000:]
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    steps = json.loads((run_dir / "results.json").read_text())["steps"]
    card = (tmp_path / "exported" / "README.md").read_text()
    assert f"- {steps} steps, global batch" in card  # the card read the run's results

    fewshot = command("vitexp.fewshot", given, "fewshot.shots=[1]", "fewshot.draws=1", cwd=tmp_path)
    assert fewshot.returncode == 0, fewshot.stderr[-2000:]
    report = json.loads((run_dir / "fewshot.json").read_text())  # in the run, by default
    assert report["pretrained"] == str(ckpt) and "digits/1shot" in report["accuracy"]

    figures = command("vitexp.visualize", given, cwd=tmp_path)
    assert figures.returncode == 0, figures.stderr[-2000:]
    report = json.loads((run_dir / "figures" / "figures.json").read_text())
    assert report["pretrained"] == str(ckpt)
    assert (run_dir / "figures" / "attention_maps.png").is_file()


def test_a_directory_without_a_checkpoint_is_named_as_such(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = command("vitexp.export", f"pretrained={empty}", f"out={tmp_path / 'x'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: pretrained={empty} holds no checkpoint: expected a .ckpt file, a run "
        "directory with checkpoints/, or a directory of runs"
    )
    assert not (tmp_path / "x").exists()
    with pytest.raises(CheckpointError, match=r"^pretrained=\S+/nope does not exist$"):
        resolve_pretrained(tmp_path / "nope")


def _run(root: Path, name: str, *ckpts: str, finished: bool = True) -> Path:
    for ckpt in ckpts:
        (root / name / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": 1}, root / name / "checkpoints" / ckpt)
    if finished:
        (root / name / "results.json").write_text("{}")
    return root / name


def test_a_run_directory_and_a_directory_of_runs_resolve_to_a_checkpoint(tmp_path: Path):
    old = _run(tmp_path, "a", "last.ckpt")
    os.utime(old / "results.json", (time.time() - 60,) * 2)
    new = _run(tmp_path, "b", "best-step=4.ckpt")  # no last.ckpt: the best one
    _run(tmp_path, "c", "last.ckpt", finished=False)  # newest, but not finished
    assert resolve_pretrained(old) == old / "checkpoints" / "last.ckpt"
    assert resolve_pretrained(new) == new / "checkpoints" / "best-step=4.ckpt"
    assert resolve_pretrained(tmp_path) == new / "checkpoints" / "best-step=4.ckpt"
    assert resolve_pretrained(tmp_path / "c") == tmp_path / "c/checkpoints/last.ckpt"


def test_a_directory_of_unfinished_runs_says_which_to_name(tmp_path: Path):
    _run(tmp_path, "a", "last.ckpt", finished=False)
    unfinished = r"holds no finished run: no results.json in a; .*: pretrained=\S+/a$"
    with pytest.raises(CheckpointError, match=unfinished):
        resolve_pretrained(tmp_path)
