"""The bad-input corpus: what a new user gets wrong, through the real command lines.

Every case must exit non-zero with exactly one line on stderr (`error: ...`) that names the
culprit, show no traceback (HYDRA_FULL_ERROR is unset), run no code from a checkpoint, and
leave every file that existed before (a finished run's checkpoint, results and config)
byte-for-byte and timestamp-for-timestamp as it was.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from data_helpers import write_folder, write_parquet

pytestmark = pytest.mark.slow

TINY = [
    "data=shapes",
    "data.num_classes=8",
    "data.shapes.num_train=64",
    "data.shapes.num_val=16",
    "data.shapes.num_test=16",
    "data.num_workers=0",
    "data.batch_size=16",
    "model.depth=1",
    "model.embed_dim=32",
    "trainer.max_steps=2",
    "trainer.max_epochs=null",
    "trainer.val_check_interval=2",
    "trainer.check_val_every_n_epoch=null",
    "trainer.progress_bar=false",
    "fewshot.enabled=false",
    "figures=false",
]
FOLDER = ["data=imagefolder", "data.num_workers=0", "data.batch_size=2"]


class _Evil:
    """Unpickling this touches a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _cases(ws: Path) -> list[tuple[str, list[str], str]]:
    """(id, command line after `python -m`, regex the one error line must match)."""
    pre = ws / "runs" / "pre"
    ckpt = pre / "checkpoints" / "last.ckpt"
    bad = ws / "bad"
    fine = ["stage=finetune", "data=digits", "data.num_classes=10", "model.depth=1"]
    fine += ["model.embed_dim=32"]
    t = ["vitexp.train", *TINY]  # each train case gets its own fresh run directory below
    stream = ["data=hf", "data.streaming=true", "data.num_classes=3", "data.test_split=null"]
    broken = ws / "data" / "broken.parquet"
    return [
        # --- configs and the command line
        ("unknown key", [*t, "model.foo=1"], r"model\.foo is not a key of model"),
        ("unknown top key", [*t, "foo=bar"], r"foo is not a key of the top level"),
        ("wrong type", [*t, "model.depth=abc"], r"model\.depth='abc'.*Integer"),
        ("unknown model", [*t, "model=vit_x"], r"model=vit_x is not a known option.*vit_b16"),
        ("unknown data", [*t, "data=mnist"], r"data=mnist is not a known option.*digits"),
        ("unknown experiment", [*t, "+experiment=nope"], r"experiment=nope is not a known"),
        ("unknown launcher", [*t, "hydra/launcher=nope"], r"launcher=nope is not a known"),
        (
            "N/A relative",
            [*t, "model/pos_embed=relative", "model.pos_embed.placement=every_layer"],
            r"relative with placement=every_layer is an N/A cell",
        ),
        (
            "N/A none",
            [*t, "model/pos_embed=none", "model.pos_embed.placement=every_layer_shared"],
            r"none with placement=every_layer_shared is an N/A cell",
        ),
        ("bad placement", [*t, "model.pos_embed.placement=everywhere"], r"placement='everywhere'"),
        ("patch grid", [*t, "model.patch_size=5"], r"does not tile into patches of 5"),
        ("image grid", [*t, "model.img_size=30"], r"image height 30 does not tile"),
        ("heads", [*t, "model.num_heads=3"], r"embed_dim=32 is not divisible by num_heads=3"),
        ("negative lr", [*t, "optim.lr=-0.1"], r"optim\.lr=-0\.1 must be > 0"),
        ("zero batch", [*t, "data.batch_size=0"], r"data\.batch_size=0 must be > 0"),
        ("precision", [*t, "trainer.precision=8"], r"trainer\.precision='8' is not allowed"),
        ("global batch", [*t, "data.global_batch_size=100"], r"global_batch_size=100 is not a"),
        ("finetune alone", [*t, "stage=finetune"], r"stage=finetune needs pretrained=PATH"),
        (
            "val interval",
            [
                *t,
                "trainer.max_steps=-1",
                "trainer.max_epochs=1",
                "trainer.val_check_interval=50",
                "trainer.check_val_every_n_epoch=1",
            ],
            r"trainer\.val_check_interval=50 is more than the 4 training batches of an epoch",
        ),  # fmt: skip
        (
            "default run dir",  # outputs/<name>/<date_time>/, made by Hydra, must go again
            [*t, "model.pool=max", "hydra.run.dir=outputs/${name}/${now:%H-%M-%S-%f}"],
            r"pool='max'",
        ),  # fmt: skip
        # zero where code would read it as "unset"
        ("zero stride", [*t, "model.patch_stride=0"], r"model\.patch_stride=0 must be >= 1"),
        ("zero heads", [*t, "model.num_heads=0"], r"model\.num_heads=0 must be > 0"),
        ("zero pre-logits", [*t, "model.representation_size=0"], r"representation_size=0"),
        ("zero devices", [*t, "trainer.devices=0"], r"trainer\.devices=0 must be >= 1"),
        ("zero timeout", [*t, "trainer.ddp_timeout_s=0"], r"trainer\.ddp_timeout_s=0"),
        ("zero val size", [*t, "data.val_size=0"], r"data\.val_size=0 must be > 0"),
        # a GPU preset on this CPU machine: say how to run it here
        ("gpu on cpu", [*t, "trainer=gpu"], r"no CUDA GPU; add trainer=cpu"),
        # --- data
        (
            "missing root",
            [*t, *FOLDER, f"data.root={ws / 'nowhere'}", "data.num_classes=3"],
            r"nowhere",
        ),
        (
            "empty folder",
            [*t, *FOLDER, f"data.root={ws / 'data' / 'empty'}", "data.num_classes=3"],
            r"empty",
        ),
        (
            "class count",
            [*t, *FOLDER, f"data.root={ws / 'data' / 'three'}", "data.num_classes=5"],
            r"3 classes.*num_classes=5|num_classes=5.*3 classes",
        ),
        (
            "corrupt images",
            [
                *t,
                *FOLDER,
                f"data.root={ws / 'data' / 'corrupt'}",
                "data.num_classes=2",
                "data.on_corrupt=error",
            ],
            r"bad\d\.png: unreadable image.*data\.on_corrupt=skip",
        ),  # fmt: skip
        (
            "batch over data",
            [
                *t,
                *FOLDER,
                f"data.root={ws / 'data' / 'three'}",
                "data.num_classes=3",
                "data.batch_size=64",
            ],
            r"data\.batch_size=64 is larger than",
        ),  # fmt: skip
        (
            "cifar not there",
            [*t, "data=cifar10", f"data.root={ws / 'data' / 'empty'}"],
            r"download=true",
        ),
        (
            "parquet not there",
            [
                *t,
                "data=hf",
                "data.dataset=parquet",
                "data.num_classes=3",
                f"data.data_files.train={ws / 'nope.parquet'}",
            ],
            r"nope\.parquet",
        ),  # fmt: skip
        ("shapes classes", [*t, "data.num_classes=100"], r"num_classes=100"),
        (
            "stream of a broken shard",
            [*t, *stream, "data.dataset=parquet", f"data.data_files.train=[{broken}]"],
            r"broken\.parquet is not a readable parquet file .*repair or remove it",
        ),  # fmt: skip
        (
            "stream not parquet",
            [*t, *stream, "data.dataset=imagefolder", f"data.root={ws / 'data' / 'three'}"],
            r"streaming=true reads parquet shards, and these are imagefolder files; pack them",
        ),  # fmt: skip
        (
            "data before device",
            ["vitexp.train", "+experiment=pretrain_in21k", f"data.root={ws / 'wrong'}"],
            r"wrong/train-\*\.parquet matches no file",  # not the missing GPU
        ),  # fmt: skip
        # --- checkpoints
        ("pretrained missing", [*t, *fine, f"pretrained={ws / 'nope.ckpt'}"], r"nope\.ckpt"),
        (
            "pretrained truncated",
            [*t, *fine, f"pretrained={bad / 'truncated.ckpt'}"],
            r"truncated\.ckpt",
        ),
        ("pretrained garbage", [*t, *fine, f"pretrained={bad / 'garbage.ckpt'}"], r"garbage"),
        ("pretrained empty", [*t, *fine, f"pretrained={bad / 'empty.ckpt'}"], r"empty\.ckpt"),
        (
            "pretrained hostile",
            [*t, *fine, f"pretrained={bad / 'hostile.ckpt'}"],
            r"hostile\.ckpt.*(code|Python objects)",
        ),
        (
            "other architecture",
            [
                *t,
                "stage=finetune",
                "data=digits",
                "data.num_classes=10",
                "model.depth=2",
                "model.embed_dim=32",
                f"pretrained={ckpt}",
            ],
            r"depth",
        ),  # fmt: skip
        ("resume truncated", [*t, f"ckpt_path={bad / 'truncated.ckpt'}"], r"truncated\.ckpt"),
        ("resume hostile", [*t, f"ckpt_path={bad / 'hostile.ckpt'}"], r"hostile\.ckpt"),
        ("resume nothing", [*t, "ckpt_path=last"], r"ckpt_path=last"),
        ("overwrite a run", [*t, f"hydra.run.dir={pre}"], r"ckpt_path=last|another dir"),
        # --- the other commands
        (
            "fewshot truncated",
            ["vitexp.fewshot", f"pretrained={bad / 'truncated.ckpt'}"],
            r"truncated\.ckpt",
        ),  # fmt: skip
        (
            "visualize hostile",
            ["vitexp.visualize", f"pretrained={bad / 'hostile.ckpt'}"],
            r"hostile\.ckpt",
        ),  # fmt: skip
        (
            "visualize images",
            ["vitexp.visualize", f"pretrained={ckpt}", f"images={ws / 'nowhere'}"],
            r"nowhere",
        ),  # fmt: skip
        (
            "fewshot shots",
            ["vitexp.fewshot", f"pretrained={ckpt}", "fewshot.shots=[0]"],
            r"shots",
        ),  # fmt: skip
        ("report missing", ["vitexp.report", str(ws / "no_sweep")], r"no_sweep"),
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A finished pretraining run, broken checkpoints and small image folders."""
    ws = tmp_path_factory.mktemp("ws")
    pre = ws / "runs" / "pre"
    done = subprocess.run(
        [sys.executable, "-m", "vitexp.train", *TINY, f"hydra.run.dir={pre}"],
        cwd=ws, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    bad = ws / "bad"
    bad.mkdir()
    good = (pre / "checkpoints" / "last.ckpt").read_bytes()
    (bad / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    (bad / "garbage.ckpt").write_bytes(os.urandom(4096))
    (bad / "empty.ckpt").write_bytes(b"")
    torch.save({"state_dict": {"w": _Evil(ws / "PWNED")}}, bad / "hostile.ckpt")
    (ws / "data" / "empty").mkdir(parents=True)
    write_folder(ws / "data" / "three", {"a": 2, "b": 2, "c": 2})
    write_parquet(ws / "data" / "stream.parquet", range(40))
    (ws / "data" / "broken.parquet").write_bytes(b"PAR1" + os.urandom(200))
    for name in ("x", "y"):
        folder = ws / "data" / "corrupt" / name
        folder.mkdir(parents=True)
        for k in range(2):
            (folder / f"bad{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return ws


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _paths(root: Path) -> list[str]:
    """Every file and directory under root (a failed command must add none: not even the
    empty run directory Hydra makes before the checks)."""
    return [str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts]


def _run(ws: Path, case: tuple[str, list[str], str], index: int) -> subprocess.CompletedProcess:
    name, argv, _ = case
    if argv[0] == "vitexp.train" and not any(a.startswith("hydra.run.dir=") for a in argv):
        argv = [*argv, f"hydra.run.dir={ws / 'outputs' / f'case{index}'}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-m", *argv], cwd=ws, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_every_bad_input_is_one_line_nonzero_and_changes_nothing(workspace: Path):
    cases = _cases(workspace)
    assert len(cases) >= 30
    before = _snapshot(workspace)
    _paths_before = _paths(workspace)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda ic: _run(workspace, ic[1], ic[0]), enumerate(cases)))
    problems = []
    for (name, _, pattern), result in zip(cases, results, strict=True):
        lines = result.stderr.strip().splitlines()
        last = lines[-1] if lines else ""
        if result.returncode == 0:
            problems.append(f"{name}: exit 0")
        elif len([line for line in lines if line.startswith("error:")]) != 1:
            problems.append(f"{name}: not one error line: {result.stderr[-600:]!r}")
        elif "Traceback" in result.stderr + result.stdout:
            problems.append(f"{name}: traceback")
        elif not re.search(pattern, last):
            problems.append(f"{name}: {last!r} does not match {pattern!r}")
        print(f"{name:22s} exit {result.returncode}  {last}")  # the corpus, with -rP
    assert not problems, "\n".join(problems)
    assert not (workspace / "PWNED").exists(), "a checkpoint ran code"
    after = _snapshot(workspace)
    changed = [path for path, facts in before.items() if after.get(path) != facts]
    assert not changed, f"existing files modified or removed: {changed}"
    # a corrupt image is found while training, when the run has begun: its directory stays,
    # with train.log ending in the error; every other case stops before writing anything
    started = {f"outputs/case{i}" for i, c in enumerate(cases) if c[0] == "corrupt images"}
    new = sorted(
        p
        for p in set(_paths(workspace)) - set(_paths_before)
        if p != "outputs" and not any(p == s or p.startswith(s + "/") for s in started)
    )
    assert not new, f"a failed command left files or directories behind: {new}"
    for run in started:
        assert "unreadable image" in (workspace / run / "train.log").read_text()
