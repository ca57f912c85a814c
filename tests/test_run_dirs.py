"""Run directories as users meet them: the README's commands after `make finetune`, a run of
its own for every override, nothing written by a run that stops on a check, a resumed run
with another model refused without touching the finished one, train.log, `pretrained=`
naming a run or a directory of runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from data_helpers import write_folder
from test_config import _cli
from test_train import TINY, train
from vitexp.errors import CheckpointError
from vitexp.training.checkpoint import resolve_pretrained
from vitexp.training.rundir import remove_new_empty_dirs

QUICK = [*TINY, "fewshot.enabled=false"]


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return _cli(*args, cwd=cwd)


def tree(root: Path) -> dict[str, tuple]:
    """Every file and directory under root, with size, mtime and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        facts = (p.stat().st_mtime_ns,)
        if p.is_file():
            facts += (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        out[str(p.relative_to(root))] = facts
    return out


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    """A workspace where `make pretrain` ran: outputs/quickstart_pretrain/quickstart."""
    ws = tmp_path_factory.mktemp("ws")
    done = cli(
        ws,
        "+experiment=quickstart_pretrain",
        *QUICK,
        "hydra.run.dir=outputs/quickstart_pretrain/quickstart",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return ws


@pytest.mark.slow
def test_readme_examples_after_the_quickstart_get_runs_of_their_own(quickstart: Path):
    ws = quickstart
    made = ws / "outputs" / "quickstart_pretrain" / "quickstart"
    before = tree(made)
    example = [
        "+experiment=quickstart_pretrain",
        "model/pos_embed=learned_2d",
        "model.pos_embed.placement=every_layer",
        *QUICK,
    ]
    first = cli(ws, *example)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = [p for p in (ws / "outputs" / "quickstart_pretrain").iterdir() if p != made]
    assert len(runs) == 1 and (runs[0] / "results.json").is_file()  # a dated run of its own
    named = cli(ws, *example, "name=qs2d")
    assert named.returncode == 0, named.stderr[-2000:]
    assert len(list((ws / "outputs" / "qs2d").glob("*/results.json"))) == 1
    assert tree(made) == before  # make's quickstart run is untouched
    # the fine-tune preset starts from the newest finished run of the name by default
    assert resolve_pretrained(ws / "outputs" / "quickstart_pretrain") == (
        runs[0] / "checkpoints" / "last.ckpt"
    )


@pytest.mark.slow
def test_resuming_with_another_model_is_refused_and_changes_nothing(quickstart: Path):
    ws = quickstart
    outputs, made = ws / "outputs", ws / "outputs" / "quickstart_pretrain" / "quickstart"
    before, paths = tree(made), set(tree(outputs))
    changed = cli(
        ws,
        "+experiment=quickstart_pretrain",
        "model/pos_embed=learned_2d",
        *QUICK,
        "ckpt_path=outputs/quickstart_pretrain/quickstart/checkpoints/last.ckpt",
    )
    assert changed.returncode == 2, changed.stderr[-2000:]
    errors = [line for line in changed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in changed.stderr
    assert "model.pos_embed.kind=learned_1d but the config has model.pos_embed.kind=" in errors[0]
    assert tree(made) == before  # no config.resume.yaml, no logs/version_N: byte for byte
    assert set(tree(outputs)) == paths  # and no new directory anywhere


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.pool=max"], "pool='max'"),
        (["model.patch_size=5"], "does not tile"),
        (
            ["model/pos_embed=none", "model.pos_embed.placement=every_layer"],
            "N/A cell",
        ),
        (["ckpt_path=last"], "nothing to resume"),
        (["+experiment=pretrain_in1k", "trainer=cpu"], "imagenet"),
        (["trainer.val_check_interval=100000", "trainer.max_epochs=1"], "val_check_interval"),
    ],
)
def test_a_run_that_stops_on_a_check_leaves_no_directory(tmp_path: Path, args, message):
    result = cli(tmp_path, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # not even an empty outputs/<name>/<date_time>/


def test_remove_new_empty_dirs_keeps_what_it_did_not_make(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "outputs" / "old"
    old.mkdir(parents=True)
    since = time.time() + 1  # everything above is "older" than the process
    remove_new_empty_dirs(old, since=since)
    assert old.is_dir()
    new = tmp_path / "outputs" / "run" / "2026-01-01"
    new.mkdir(parents=True)
    remove_new_empty_dirs(new, since=since - 10)
    assert not (tmp_path / "outputs" / "run").exists() and old.is_dir()  # stops at non-empty
    full = tmp_path / "outputs" / "full"
    full.mkdir()
    (full / "x").write_text("x")
    remove_new_empty_dirs(full, since=since - 10)
    assert (full / "x").is_file()


def test_train_log_holds_the_console_lines(tmp_path: Path):
    train(tmp_path / "run", "trainer.max_steps=4", "trainer.val_check_interval=2")
    text = (tmp_path / "run" / "train.log").read_text()
    assert f"run: {tmp_path / 'run'}" in text
    assert "model: vit_tiny_debug (" in text and "learned_1d/stem, cls)" in text
    assert "data: shapes, 8 classes, pretrain" in text
    assert "step 2 (epoch 0): " in text and "val/acc" in text and "step 4 (epoch 0)" in text
    assert "pretrain on shapes: test accuracy" in text


@pytest.mark.slow
def test_train_log_ends_with_the_error_that_stopped_the_run(tmp_path: Path):
    result = cli(tmp_path, *QUICK, "hydra.run.dir=run", "optim.lr=1e30", "schedule.warmup_steps=0")
    assert result.returncode == 3
    lines = (tmp_path / "run" / "train.log").read_text().strip().splitlines()
    assert "error: training loss is" in lines[-1]


def test_imagefolder_class_count_comes_from_the_folders(tmp_path: Path):
    write_folder(tmp_path / "img", {"a": 4, "b": 4, "c": 4})
    results = train(
        tmp_path / "run",
        "data=imagefolder",
        f"data.root={tmp_path / 'img'}",
        "data.num_classes=null",
        "data.batch_size=4",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
    )
    assert results["steps"] == 1
    assert "data.num_classes=3, from the data" in (tmp_path / "run" / "train.log").read_text()


def test_pretrained_names_a_checkpoint_a_run_or_the_newest_finished_run(tmp_path: Path):
    runs = tmp_path / "pretrain_in21k"
    for name, finished in (("a", True), ("b", True), ("c", False)):
        ckpt = runs / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        if finished:
            (runs / name / "results.json").write_text(json.dumps({}))
            time.sleep(0.02)
    newest = runs / "b" / "checkpoints" / "last.ckpt"
    assert resolve_pretrained(runs) == newest  # c is newer but unfinished
    assert resolve_pretrained(runs / "c") == runs / "c" / "checkpoints" / "last.ckpt"
    assert resolve_pretrained(newest) == newest
    with pytest.raises(CheckpointError, match=r"pretrained=.*nowhere does not exist$"):
        resolve_pretrained(tmp_path / "nowhere")
