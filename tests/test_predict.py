"""`python -m vitexp.predict`: a checkpoint's own preprocessing, class names and
probabilities (softmax or sigmoid), a CSV of the top-k, unreadable files skipped or fatal."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from test_train import train
from vitexp.data.config import AugmentConfig
from vitexp.data.transforms import build_transforms
from vitexp.errors import DataError
from vitexp.predict import PredictCommandConfig, predict
from vitexp.training.checkpoint import read_model

FAST = ["trainer.max_steps=2", "fewshot.enabled=false"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A shapes pretraining per loss (softmax, sigmoid), a few steps each."""
    root = tmp_path_factory.mktemp("predict")
    found = {}
    for loss in ("softmax", "sigmoid"):
        train(root / loss, *FAST, f"loss.name={loss}")
        found[loss] = root / loss / "checkpoints" / "last.ckpt"
    return found


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Five images of different sizes and modes in two folders, and one broken file."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    g = torch.Generator().manual_seed(0)
    for i, (size, mode) in enumerate(
        [(32, "RGB"), (40, "L"), (50, "RGBA"), (28, "P"), (64, "RGB")]
    ):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        img = Image.fromarray(pixels).convert(mode)
        img.save(folder / ("sub" if i % 2 else ".") / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def test_predictions_use_the_checkpoints_preprocessing_and_names(checkpoints, images, tmp_path):
    out = tmp_path / "p.csv"
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*broken\.png"):
        rows = predict(PredictCommandConfig(str(checkpoints["softmax"]), str(images), 3, str(out)))
    assert len(rows) == 5 and not any("broken" in r["file"] for r in rows)
    model, meta = read_model(checkpoints["softmax"])
    assert meta["class_names"][0] == "disc@top-left"
    first = Image.open(images / "img0.png")
    pipeline = build_transforms(
        AugmentConfig(crop_pct=meta["eval_crop_pct"]),
        model.img_size,
        model.cfg.mean,
        model.cfg.std,
        train=False,
    )
    with torch.no_grad():
        probs = model(pipeline(first.convert("RGB"))[None]).softmax(-1)[0]
    row = next(r for r in rows if r["file"].endswith("img0.png"))
    best = int(probs.argmax())
    assert row["label_1"] == meta["class_names"][best]
    assert row["prob_1"] == pytest.approx(float(probs[best]), abs=1e-5)
    assert row["prob_1"] >= row["prob_2"] >= row["prob_3"]
    with out.open() as f:
        written = list(csv.DictReader(f))
    assert [r["file"] for r in written] == [r["file"] for r in rows]
    assert list(written[0]) == [
        "file",
        "label_1",
        "prob_1",
        "label_2",
        "prob_2",
        "label_3",
        "prob_3",
    ]


def test_sigmoid_checkpoints_give_sigmoid_probabilities(checkpoints, images, tmp_path):
    c = PredictCommandConfig(
        str(checkpoints["sigmoid"]), str(images / "img0.png"), 8, str(tmp_path / "s.csv")
    )
    (row,) = predict(c)
    probs = [row[f"prob_{k}"] for k in range(1, 9)]
    model, meta = read_model(checkpoints["sigmoid"])
    logits = model(
        build_transforms(
            AugmentConfig(crop_pct=meta["eval_crop_pct"]),
            model.img_size,
            model.cfg.mean,
            model.cfg.std,
            False,
        )(Image.open(images / "img0.png").convert("RGB"))[None]
    )[0]
    assert sorted(probs, reverse=True) == pytest.approx(
        sorted(torch.sigmoid(logits).tolist(), reverse=True), abs=1e-5
    )
    assert sum(probs) != pytest.approx(1.0, abs=1e-3)  # independent sigmoids, not a softmax


def test_unreadable_images_stop_the_run_with_on_corrupt_error(checkpoints, images, tmp_path):
    c = PredictCommandConfig(
        str(checkpoints["softmax"]), str(images), out=str(tmp_path / "e.csv"), on_corrupt="error"
    )
    with pytest.raises(DataError, match=r"broken\.png: unreadable image .*on_corrupt=skip"):
        predict(c)
    assert not (tmp_path / "e.csv").exists()


def test_the_command_line_says_what_is_missing_in_one_line(checkpoints, tmp_path):
    run = [sys.executable, "-m", "vitexp.predict", f"pretrained={checkpoints['softmax']}"]
    out = subprocess.run([*run, f"images={tmp_path / 'nothing'}"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "images=" in out.stderr and "does not exist" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize(
    "name, options",
    [
        ("bit_tiny_debug", {}),  # the CNN baseline
        ("hybrid_r50_b16", dict(img_size=32, embed_dim=32, depth=1, num_heads=2)),
        ("vit_tiny_debug", dict(pos_embed="relative", pool="gap", class_token=False)),
        ("vit_tiny_debug", dict(pos_embed={"kind": "learned_2d", "placement": "every_layer"})),
        ("vit_tiny_debug", dict(patch_size=8, patch_stride=4, img_size=(32, 24))),
    ],
    ids=["bit", "hybrid", "relative_gap", "2d_every_layer", "overlap_non_square"],
)
def test_every_model_kind_predicts_what_it_computes(images, tmp_path, name, options):
    from vitexp.models import create_model
    from vitexp.models.factory import model_record

    from conftest import randomize_

    net = randomize_(create_model(name, num_classes=3, **options), std=0.2).eval()
    record = {**model_record(net), "class_names": ["a", "b", "c"], "eval_crop_pct": 1.0}
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"vitexp": record, "state_dict": state}, tmp_path / "m.ckpt")
    c = PredictCommandConfig(
        str(tmp_path / "m.ckpt"), str(images / "sub"), 2, str(tmp_path / "o.csv")
    )
    rows = predict(c)
    assert [Path(r["file"]).name for r in rows] == ["img1.png", "img3.png"]
    pipeline = build_transforms(
        AugmentConfig(crop_pct=1.0), net.img_size, net.cfg.mean, net.cfg.std, train=False
    )
    for row in rows:
        image = Image.open(row["file"]).convert("RGB")
        with torch.no_grad():
            probs = net(pipeline(image)[None]).softmax(-1)[0]
        best = int(probs.argmax())
        assert row["label_1"] == "abc"[best]
        assert row["prob_1"] == pytest.approx(float(probs[best]), abs=1e-5)
