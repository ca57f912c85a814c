"""The ablation report: the paper's layout from a sweep directory, partial sweeps, a real
4 x 3 sweep with its N/A cells."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer
from PIL import Image

from vitexp.models.pos_embed import STEM_ONLY_KINDS
from vitexp.report import COLUMNS, collect, report, summarise, table_figure


def write_job(
    sweep: Path, num: int, kind: str, placement: str, seed: int, value=None, status="done"
) -> None:
    job = sweep / str(num)
    job.mkdir(parents=True)
    record = {"status": status, "seed": seed, "pos_embed": {"kind": kind, "placement": placement}}
    if status == "done":
        record.update(fewshot={"digits/10shot": value}, fewshot_report="digits/10shot")
    if status == "failed":
        (job / "failed.json").write_text(json.dumps(record))
    elif status == "running":
        (job / "config.yaml").write_text(
            f"seed: {seed}\nmodel:\n  pos_embed:\n    kind: {kind}\n    placement: {placement}\n"
        )
    else:
        (job / "results.json").write_text(json.dumps(record))


def test_table_layout_seeds_and_partial_cells(tmp_path: Path):
    write_job(tmp_path, 0, "learned_1d", "stem", 0, 0.60)
    write_job(tmp_path, 1, "learned_1d", "stem", 1, 0.70)
    write_job(tmp_path, 2, "none", "stem", 0, 0.50)
    write_job(tmp_path, 3, "none", "every_layer", 0, status="n/a")
    write_job(tmp_path, 4, "learned_2d", "every_layer", 0, status="failed")
    write_job(tmp_path, 5, "relative", "stem", 0, status="running")
    write_job(tmp_path, 6, "learned_2d", "stem", 0, 0.55)
    write_job(tmp_path, 7, "learned_2d", "stem", 1, status="running")
    cells = report(tmp_path)
    assert cells[("learned_1d", "stem")].mean == pytest.approx(0.65)
    table = (tmp_path / "table.md").read_text()
    lines = {
        line.split(" | ")[0].strip("| "): line
        for line in table.splitlines()
        if line.startswith("| ")
    }
    assert lines["1-D Pos. Emb."] == "| 1-D Pos. Emb. | 0.6500 ± 0.0707 | not run | not run |"
    assert lines["No Pos. Emb."] == "| No Pos. Emb. | 0.5000 | N/A | N/A |"
    assert lines["2-D Pos. Emb."] == "| 2-D Pos. Emb. | 0.5500, running (1) | failed | not run |"
    assert lines["Rel. Pos. Emb."] == "| Rel. Pos. Emb. | running | N/A | N/A |"
    assert "sin-cos" not in table  # only when swept
    assert "(digits/10shot), mean ± std over seeds [0, 1]" in table
    rows = {(r["kind"], r["placement"]): r for r in csv.DictReader((tmp_path / "table.csv").open())}
    assert (
        rows[("learned_1d", "stem")]["n"] == "2" and rows[("learned_1d", "stem")]["seeds"] == "0 1"
    )
    assert rows[("relative", "every_layer")]["status"] == "N/A"
    assert rows[("none", "stem")]["paper"] == "0.61382"
    image = Image.open(tmp_path / "table.png").convert("L")
    assert image.size[0] > 300 and len(set(image.getdata())) > 10  # a drawn chart, not blank


def placement_colours(sweep: Path) -> tuple[dict[str, set[str]], dict[str, str]]:
    """The chart's bar colours and legend colour per placement label."""
    [ax] = table_figure(*summarise(collect(sweep))).axes
    bars = {
        c.get_label(): {to_hex(p.get_facecolor()) for p in c.patches}
        for c in ax.containers
        if isinstance(c, BarContainer)
    }
    legend = ax.get_legend()
    handles = {
        t.get_text(): to_hex(h.get_facecolor())
        for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)
    }
    return {label: c for label, c in bars.items() if c}, handles


@pytest.mark.parametrize(
    "present",
    [
        [("learned_1d", "stem"), ("learned_2d", "every_layer")],  # the sweep
        [("none", "stem"), ("learned_1d", "stem")],
        [("learned_2d", "every_layer_shared")],
    ],
)
def test_each_placement_keeps_its_colour_in_a_partial_sweep(tmp_path: Path, present):
    num = 0
    for kind in ("none", "learned_1d", "learned_2d", "relative"):
        for placement in COLUMNS:
            na = kind in STEM_ONLY_KINDS and placement != "stem"
            write_job(tmp_path / "full", num, kind, placement, 0, 0.6, "n/a" if na else "done")
            num += 1
    for num, (kind, placement) in enumerate(present):
        write_job(tmp_path / "partial", num, kind, placement, 0, 0.6)
    write_job(tmp_path / "partial", num + 1, "learned_1d", "every_layer", 0, status="running")
    full_bars, full_legend = placement_colours(tmp_path / "full")
    bars, legend = placement_colours(tmp_path / "partial")
    assert list(legend) == list(COLUMNS.values())  # every placement, present or not
    assert len(set(legend.values())) == 3
    assert legend == full_legend  # a placement's colour is the same in any sweep
    assert full_bars == {label: {colour} for label, colour in legend.items()}
    assert bars == {COLUMNS[p]: {legend[COLUMNS[p]]} for _, p in present}


def test_empty_directory_is_one_line(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "vitexp.report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"error: {tmp_path} holds no sweep jobs (no */results.json or */config.yaml)"
    )


@pytest.mark.slow
def test_full_grid_typed_on_the_command_line_skips_na_cells(tmp_path: Path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitexp.train",
            "-m",
            "model.pos_embed.kind=none,learned_1d,learned_2d,relative",
            "model.pos_embed.placement=stem,every_layer,every_layer_shared",
            "data=shapes",
            "data.num_classes=8",
            "data.shapes.num_train=128",
            "data.shapes.num_val=32",
            "data.shapes.num_test=32",
            "data.batch_size=32",
            "model.depth=1",
            "model.embed_dim=32",
            "trainer.max_steps=2",
            "trainer.max_epochs=null",
            "trainer.val_check_interval=2",
            "trainer.check_val_every_n_epoch=null",
            "trainer.progress_bar=false",
            "figures=false",
            "fewshot.shots=[1,10]",
            "fewshot.draws=1",
            f"hydra.sweep.dir={sweep}",
            f"output_root={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert len(records) == 12
    assert sorted(r["status"] for r in records) == ["done"] * 8 + ["n/a"] * 4
    assert {
        (r["pos_embed"]["kind"], r["pos_embed"]["placement"])
        for r in records
        if r["status"] == "n/a"
    } == {
        ("none", "every_layer"),
        ("none", "every_layer_shared"),
        ("relative", "every_layer"),
        ("relative", "every_layer_shared"),
    }
    assert len(list(sweep.glob("*/checkpoints"))) == 8  # N/A cells train nothing
    cells = report(sweep)
    assert sum(1 for c in cells.values() if c.values) == 8
