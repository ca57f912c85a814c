"""`python -m vitexp.evaluate`: a checkpoint at other test resolutions (its own test at the
training resolution, exactly), one-line errors, and `vitexp.report`'s resolution chart."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_report import write_job
from test_reproduce import check_page
from test_train import train
from vitexp.analysis.report_html import resolution_section
from vitexp.analysis.tables import report
from vitexp.errors import ConfigError
from vitexp.evaluate import EvaluateCommandConfig, evaluate

# vit_tiny_debug: 32 px, 4 px patches; a weight average, so that raw and averaged differ
RUN = ["trainer.max_steps=6", "fewshot.enabled=false", "ema.decay=0.5", "data.shapes.num_test=64"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    cache = run_dir.parent / "cache"
    train(run_dir, *RUN, f"data.shapes.cache_dir={cache}")
    return run_dir


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_the_training_resolution_gives_the_runs_own_test_accuracy(run_dir: Path):
    report = evaluate(EvaluateCommandConfig(str(run_dir), resolutions=[24, 32, 48]))
    assert report == json.loads((run_dir / "resolutions.json").read_text())
    assert [r["resolution"] for r in report["results"]] == [24, 32, 48]
    assert {r["n"] for r in report["results"]} == {64}
    assert report["train_resolution"] == [32, 32] and report["train_patch_size"] == 4
    assert report["variant"] == {"kind": "learned_1d", "placement": "stem"}
    assert report["data"] == "shapes" and report["weights"].startswith("averaged")
    at_train = report["results"][1]
    expected = results(run_dir)["metrics"]["test/acc"]
    assert at_train["accuracy"] == pytest.approx(expected, abs=1e-6)
    assert at_train["correct"] == round(expected * 64)
    for r in report["results"]:
        assert r["patch_size"] == 4 and r["accuracy"] == r["correct"] / r["n"]


def test_raw_weights_give_the_runs_raw_test_accuracy(run_dir: Path, tmp_path: Path):
    out = tmp_path / "raw.json"
    report = evaluate(EvaluateCommandConfig(str(run_dir), [32], weights="raw", out=str(out)))
    assert out.is_file() and report["weights"] == "trained"
    expected = results(run_dir)["metrics_raw"]["test/acc"]
    assert report["results"][0]["accuracy"] == pytest.approx(expected, abs=1e-6)


def test_other_patch_sizes(run_dir: Path, tmp_path: Path):
    out = tmp_path / "p.json"
    report = evaluate(EvaluateCommandConfig(str(run_dir), [32], patch_sizes=[4, 8], out=str(out)))
    assert [(r["resolution"], r["patch_size"]) for r in report["results"]] == [(32, 4), (32, 8)]
    expected = results(run_dir)["metrics"]["test/acc"]
    assert report["results"][0]["accuracy"] == pytest.approx(expected, abs=1e-6)
    assert 0.0 <= report["results"][1]["accuracy"] <= 1.0


def test_bad_inputs_are_config_errors(run_dir: Path, tmp_path: Path):
    bad = {
        "resolutions is not set": dict(),
        r"resolution 30: image height 30 does not tile into patches of 4": dict(
            resolutions=[32, 30]
        ),
        r"resolutions: 'x' is not a size": dict(resolutions=["x"]),
        "rope_positions='sideways'": dict(resolutions=[32], rope_positions="sideways"),
    }
    for message, kwargs in bad.items():
        with pytest.raises(ConfigError, match=message):
            evaluate(EvaluateCommandConfig(str(run_dir), out=str(tmp_path / "x.json"), **kwargs))
    assert not (tmp_path / "x.json").exists()  # nothing scored, nothing written

    from vitexp.data.config import DataConfig

    with pytest.raises(ConfigError, match="data=digits has 10 classes but the model's head 8"):
        evaluate(EvaluateCommandConfig(str(run_dir), [32], data=DataConfig(num_workers=0)))


def command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitexp.evaluate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_command_errors_are_one_line(run_dir: Path, tmp_path: Path):
    proc = command(f"pretrained={run_dir}", "resolutions=[32,30]", cwd=tmp_path)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: resolution 30: image height 30 does not tile"), line
    proc = command(f"pretrained={tmp_path}/nope.ckpt", "resolutions=[32]", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: pretrained={tmp_path}/nope.ckpt does not exist"


# --- vitexp.report ---------------------------------------------------------------------------
def write_resolutions(sweep: Path, num: int, kind: str, accuracies: list[float]) -> None:
    record = {
        "pretrained": f"{sweep}/{num}/checkpoints/last.ckpt",
        "model": "vit_tiny_p8",
        "variant": {"kind": kind, "placement": "stem"},
        "train_resolution": [32, 32],
        "train_patch_size": 8,
        "rope_positions": None,
        "data": "shapes",
        "results": [
            {"resolution": r, "patch_size": 8, "accuracy": a, "correct": round(a * 100), "n": 100}
            for r, a in zip([24, 32, 48], accuracies, strict=True)
        ],
    }
    (sweep / str(num) / "resolutions.json").write_text(json.dumps(record))


def test_report_draws_accuracy_against_resolution(tmp_path: Path):
    sweep = tmp_path / "table8"
    scores = {
        (0, "learned_1d", 0): [0.5, 0.7, 0.6],
        (1, "learned_1d", 1): [0.6, 0.8, 0.4],
        (2, "learned_2d", 0): [0.55, 0.75, 0.7],
        (3, "learned_2d", 1): [0.55, 0.65, 0.7],
    }
    for (num, kind, seed), accuracies in scores.items():
        write_job(sweep, num, kind, "stem", seed, 0.5)
        write_resolutions(sweep, num, kind, accuracies)
    write_job(sweep, 4, "none", "stem", 0, 0.3)  # a job never scored at other resolutions
    report(sweep)
    rows = list(csv.DictReader((sweep / "resolution.csv").open()))
    assert list(rows[0]) == ["variant", "resolution", "patch_size", "mean", "se", "n"]
    got = {(r["variant"], r["resolution"]): r for r in rows}
    assert sorted(got) == [(v, r) for v in ("1-D / stem", "2-D / stem") for r in ("24", "32", "48")]
    row = got[("1-D / stem", "48")]
    assert (row["patch_size"], row["n"]) == ("8", "2")
    assert float(row["mean"]) == pytest.approx(0.5)
    assert float(row["se"]) == pytest.approx(0.1)  # std 0.1414 / sqrt(2)
    assert float(got[("2-D / stem", "24")]["se"]) == pytest.approx(0.0)
    image = Image.open(sweep / "resolution.png").convert("L")
    assert image.size[0] > 300 and len(np.unique(np.asarray(image))) > 10

    html = tmp_path / "report.html"
    html.write_text(f"<html><body>{resolution_section(tmp_path, 'table8')}</body></html>")
    page = check_page(html)
    assert len(page.images) == 1 and page.cells[:2] == ["0.5500", "0.0500"]  # 1-D at 24 px


def test_a_sweep_without_resolutions_is_unchanged(tmp_path: Path):
    write_job(tmp_path, 0, "learned_1d", "stem", 0, 0.5)
    report(tmp_path)
    assert not (tmp_path / "resolution.csv").exists()
    assert not (tmp_path / "resolution.png").exists()
    assert resolution_section(tmp_path.parent, tmp_path.name) == ""
