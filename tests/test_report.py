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
from matplotlib.container import BarContainer, ErrorbarContainer
from PIL import Image

from vitexp.analysis.tables import (
    COLUMNS,
    choose_view,
    collect,
    find_axes,
    report,
    scaling_figure,
    summarise,
    summarise_axes,
    table_figure,
)
from vitexp.models.pos_embed import STEM_ONLY_KINDS


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
    cells = report(tmp_path).cells
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
    cells = report(sweep).cells
    assert sum(1 for c in cells.values() if c.values) == 8


# --- any sweep: the axes come from the jobs' overrides --------------------------------------

CONSTANT = ["+experiment=quickstart_pretrain", "trainer.max_steps=100", "fewshot.draws=1"]


def write_run(
    sweep: Path,
    num: int,
    overrides: dict,
    status: str = "done",
    *,
    fewshot: float | None = None,
    test_acc: float | None = None,
    train_images: int | None = None,
) -> None:
    """A job as vitexp.train (results.json), a failed sweep job (failed.json) or a running
    one (config.yaml only, its values where the resolved config holds them) leaves it."""
    job = sweep / str(num)
    job.mkdir(parents=True)
    seed = overrides.get("seed", 0)
    model = overrides.get("model", "vit_tiny_debug")
    if status == "running":
        config = {
            "seed": seed,
            "model": {"name": model, "pos_embed": {"kind": "learned_1d", "placement": "stem"}},
            "data": {"name": "shapes", "subset": None},
            "optim": {"name": "adamw", "lr": 0.001},
        }
        for key, value in overrides.items():
            if "." in key:
                *parents, leaf = key.split(".")
                node = config
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[leaf] = value
        (job / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
        return
    record = {
        "status": status,
        "seed": seed,
        "data": "shapes",
        "pos_embed": {
            "kind": overrides.get("model.pos_embed.kind", "learned_1d"),
            "placement": overrides.get("model.pos_embed.placement", "stem"),
        },
        "overrides": CONSTANT + [f"{k}={v}" for k, v in overrides.items()],
    }
    if status == "done":
        record.update(
            model=model,
            metrics={"test/acc": test_acc, "test/loss": 1.0},
            fewshot=None if fewshot is None else {"digits/10shot": fewshot},
            fewshot_report=None if fewshot is None else "digits/10shot",
            train_images=train_images,
            data_subset=overrides.get("data.subset"),
        )
    name = "failed.json" if status == "failed" else "results.json"
    (job / name).write_text(json.dumps(record))


def analyse(sweep: Path) -> tuple[list, list[str], str]:
    jobs = collect(sweep)
    axes, recorded = find_axes(jobs)
    return jobs, axes, choose_view(axes, recorded, jobs)


def read_csv(path: Path, *key: str) -> dict[tuple[str, ...], dict[str, str]]:
    return {tuple(r[k] for k in key): r for r in csv.DictReader(path.open())}


def drawn(png: Path) -> bool:
    image = Image.open(png).convert("L")
    return image.size[0] > 300 and len(set(image.get_flattened_data())) > 10


def test_axes_from_overrides_failed_and_running_jobs(tmp_path: Path):
    num = 0
    for model in ("vit_tiny_debug", "bit_tiny_debug"):
        for subset in (100, 1000):
            write_run(
                tmp_path, num, {"model": model, "data.subset": subset, "seed": 0}, fewshot=0.5
            )
            num += 1
    write_run(tmp_path, 4, {"model": "vit_tiny_debug", "data.subset": 100, "seed": 1}, "failed")
    # the only job of subset 10000 is still running: its config.yaml gives both axis values
    write_run(tmp_path, 5, {"model": "bit_tiny_debug", "data.subset": 10000, "seed": 1}, "running")
    jobs, axes, view = analyse(tmp_path)
    assert axes == ["model", "data.subset"]  # seed and the constant overrides are no axes
    assert view == "scaling"
    assert [j.status for j in jobs][4:] == ["failed", "running"]
    assert jobs[4].axes == {**jobs[0].axes, "data.subset": 100}
    assert jobs[5].axes["model"] == "bit_tiny_debug" and jobs[5].axes["data.subset"] == 10000
    assert jobs[5].seed == 1

    # a record's `+key=` and a config's value are the same value: 1e-3 is 0.001
    sweep = tmp_path / "lr"
    write_run(sweep, 0, {"optim.lr": "1e-3", "seed": 0}, fewshot=0.5)
    write_run(sweep, 1, {"optim.lr": "3e-3", "seed": 0}, fewshot=0.6)
    write_run(sweep, 2, {"optim.lr": 0.001, "seed": 1}, status="running")
    jobs, axes, view = analyse(sweep)
    assert (axes, view) == (["optim.lr"], "table")
    assert jobs[2].axes["optim.lr"] == jobs[0].axes["optim.lr"] == 0.001

    # the paper's ablation, with its overrides recorded: still Table 8
    sweep = tmp_path / "posemb"
    for num, (kind, placement) in enumerate([("none", "stem"), ("learned_1d", "every_layer")]):
        over = {"model.pos_embed.kind": kind, "model.pos_embed.placement": placement, "seed": 0}
        write_run(sweep, num, over, fewshot=0.5)
    write_run(sweep, 2, {"model.pos_embed.kind": "none", "seed": 0}, "failed")
    _, axes, view = analyse(sweep)
    assert (set(axes), view) == ({"model.pos_embed.kind", "model.pos_embed.placement"}, "table8")
    cells = report(sweep).cells
    assert cells[("learned_1d", "every_layer")].mean == 0.5
    assert "| No Pos. Emb. | 0.5000, failed (1) | N/A | N/A |" in (sweep / "table.md").read_text()


def test_data_scaling_view_is_figure_4(tmp_path: Path):
    # (model, subset, train_images): {seed: (few-shot, test acc)}; subset 1.0 is all of A
    runs = {
        ("vit_tiny_debug", 100, 100): {0: (0.30, 0.10), 1: (0.40, 0.20)},
        ("vit_tiny_debug", 1000, 1000): {0: (0.50, 0.30), 1: (0.60, 0.50), 2: (0.70, 0.40)},
        ("vit_tiny_debug", 1.0, 12800): {0: (0.80, 0.60)},
        ("bit_tiny_debug", 100, 100): {0: (0.45, 0.15), 1: (0.55, 0.25)},
        ("bit_tiny_debug", 1000, 1000): {0: (0.65, 0.35), 1: (0.65, 0.45)},
    }
    num = 0
    for (model, subset, images), seeds in runs.items():
        for seed, (fewshot, test_acc) in seeds.items():
            over = {"model": model, "data.subset": subset, "seed": seed}
            write_run(tmp_path, num, over, fewshot=fewshot, test_acc=test_acc, train_images=images)
            num += 1
    write_run(tmp_path, num, {"model": "bit_tiny_debug", "data.subset": 1.0, "seed": 0}, "failed")
    write_run(
        tmp_path, num + 1, {"model": "bit_tiny_debug", "data.subset": 1.0, "seed": 1}, "running"
    )

    cells = report(tmp_path).cells
    assert cells[("vit_tiny_debug", "1000")].mean == pytest.approx(0.6)
    rows = read_csv(tmp_path / "table.csv", "model", "train_images")
    assert list(rows) == [  # by model, then by the number of images
        ("bit_tiny_debug", "100"),
        ("bit_tiny_debug", "1000"),
        ("bit_tiny_debug", ""),  # only a failed and a running job: no image count yet
        ("vit_tiny_debug", "100"),
        ("vit_tiny_debug", "1000"),
        ("vit_tiny_debug", "12800"),
    ]
    row = rows[("vit_tiny_debug", "1000")]
    assert (row["mean"], row["std"], row["n"], row["seeds"]) == (
        "0.600000",
        "0.100000",
        "3",
        "0 1 2",
    )
    assert (row["test_acc_mean"], row["test_acc_std"]) == ("0.400000", "0.100000")
    assert (row["data.subset"], row["score"], row["status"]) == ("1000", "digits/10shot", "done")
    row = rows[("bit_tiny_debug", "1000")]
    assert (row["mean"], row["std"], row["test_acc_mean"]) == ("0.650000", "0.000000", "0.400000")
    row = rows[("vit_tiny_debug", "12800")]
    assert (row["mean"], row["std"], row["n"], row["data.subset"]) == ("0.800000", "", "1", "1.0")
    row = rows[("bit_tiny_debug", "")]
    assert (row["status"], row["failed"], row["running"], row["n"]) == ("failed", "1", "1", "0")

    table = (tmp_path / "table.md").read_text()
    assert table.startswith(
        "Few-shot linear accuracy (digits/10shot) against the number of pretraining images "
        "(the paper's Figure 4), mean ± std over seeds [0, 1, 2]; 10 trained jobs, 1 failed, "
        "1 running. Swept: model, data.subset."
    )
    assert (
        "| model | data.subset | train images | digits/10shot | test/acc | n | seeds | failed "
        "| running |" in table
    )
    assert (
        "| vit_tiny_debug | 1000 | 1000 | 0.6000 ± 0.1000 | 0.4000 ± 0.1000 | 3 | 0 1 2 | 0 | 0 |"
        in table
    )
    assert "| bit_tiny_debug | 1.0 |  | running |  | 0 |  | 1 | 1 |" in table
    assert drawn(tmp_path / "table.png")

    jobs, axes, view = analyse(tmp_path)
    [ax] = scaling_figure(summarise_axes(jobs, axes, view)).axes
    assert ax.get_xscale() == "log"
    lines = {c.get_label(): c.lines[0] for c in ax.containers if isinstance(c, ErrorbarContainer)}
    assert sorted(lines) == ["bit_tiny_debug", "vit_tiny_debug"]
    assert list(lines["vit_tiny_debug"].get_xdata()) == [100, 1000, 12800]
    assert list(lines["vit_tiny_debug"].get_ydata()) == pytest.approx([0.35, 0.6, 0.8])
    assert list(lines["bit_tiny_debug"].get_xdata()) == [100, 1000]


def test_plain_table_for_any_other_sweep(tmp_path: Path):
    # fine-tuning runs: no few-shot score, so the score is the test accuracy
    accs = {"1e-3": [0.80, 0.90, 0.85], "3e-3": [0.60, 0.70]}
    num = 0
    for lr, values in accs.items():
        for seed, acc in enumerate(values):
            write_run(tmp_path, num, {"optim.lr": lr, "seed": seed}, test_acc=acc)
            num += 1
    write_run(tmp_path, num, {"optim.lr": "3e-3", "seed": 2}, status="failed")
    write_run(tmp_path, num + 1, {"optim.lr": "1e-2", "seed": 0}, status="running")

    cells = report(tmp_path).cells
    assert list(cells) == [("0.001",), ("0.003",), ("0.01",)]
    assert cells[("0.001",)].mean == pytest.approx(0.85)
    rows = read_csv(tmp_path / "table.csv", "optim.lr")
    assert rows[("0.001",)]["score"] == "test/acc"
    assert (rows[("0.001",)]["mean"], rows[("0.001",)]["std"]) == ("0.850000", "0.050000")
    assert (rows[("0.003",)]["n"], rows[("0.003",)]["seeds"], rows[("0.003",)]["failed"]) == (
        "2",
        "0 1",
        "1",
    )
    assert rows[("0.01",)]["status"] == "running"
    table = (tmp_path / "table.md").read_text()
    assert "Test accuracy (test/acc), mean ± std over seeds [0, 1, 2]" in table
    assert "5 trained jobs, 1 failed, 1 running. Swept: optim.lr." in table
    assert "| optim.lr | test/acc | n | seeds | failed | running |" in table
    assert "| 0.003 | 0.6500 ± 0.0707 | 2 | 0 1 | 1 | 0 |" in table
    assert "| 0.01 | running | 0 |  | 0 | 1 |" in table
    assert drawn(tmp_path / "table.png")


@pytest.mark.parametrize("with_subset", [False, True])
def test_runs_differing_in_an_axis_are_never_averaged(tmp_path: Path, with_subset: bool):
    scores = {("vit_tiny_debug", 0): 0.2, ("vit_tiny_debug", 1): 0.4}
    scores |= {("bit_tiny_debug", 0): 0.8, ("bit_tiny_debug", 1): 0.6}
    for num, ((model, seed), score) in enumerate(scores.items()):
        over = {"model": model, "seed": seed}
        if with_subset:  # two sizes of A as well: 4 lines' points, never one mean of 8 runs
            over["data.subset"] = 100
        write_run(tmp_path, num, over, fewshot=score, test_acc=score, train_images=100)
    if with_subset:
        for num, ((model, seed), score) in enumerate(scores.items(), start=4):
            over = {"model": model, "data.subset": 1000, "seed": seed}
            write_run(tmp_path, num, over, fewshot=score + 0.1, train_images=1000)
    cells = report(tmp_path).cells
    means = {key: (cell.mean, len(cell.values)) for key, cell in cells.items()}
    if with_subset:
        assert means == {
            ("bit_tiny_debug", "100"): (pytest.approx(0.7), 2),
            ("bit_tiny_debug", "1000"): (pytest.approx(0.8), 2),
            ("vit_tiny_debug", "100"): (pytest.approx(0.3), 2),
            ("vit_tiny_debug", "1000"): (pytest.approx(0.4), 2),
        }
    else:
        assert means == {
            ("bit_tiny_debug",): (pytest.approx(0.7), 2),
            ("vit_tiny_debug",): (pytest.approx(0.3), 2),
        }
    assert len(list(csv.DictReader((tmp_path / "table.csv").open()))) == len(cells)


def test_position_embeddings_of_two_models_are_not_table_8(tmp_path: Path):
    """A position-embedding sweep that also varies the model is not the paper's layout:
    Table 8 would average the two models into each cell."""
    num = 0
    for model, score in (("vit_tiny_debug", 0.3), ("bit_tiny_debug", 0.7)):
        for kind in ("learned_1d", "learned_2d"):
            for seed in (0, 1):
                over = {"model": model, "model.pos_embed.kind": kind, "seed": seed}
                write_run(tmp_path, num, over, fewshot=score + seed / 10)
                num += 1
    _, axes, view = analyse(tmp_path)
    assert (axes, view) == (["model", "model.pos_embed.kind"], "table")
    cells = report(tmp_path).cells
    assert {k: round(c.mean, 6) for k, c in cells.items()} == {
        ("bit_tiny_debug", "learned_1d"): 0.75,
        ("bit_tiny_debug", "learned_2d"): 0.75,
        ("vit_tiny_debug", "learned_1d"): 0.35,
        ("vit_tiny_debug", "learned_2d"): 0.35,
    }
    assert "| model | model.pos_embed.kind | digits/10shot |" in (tmp_path / "table.md").read_text()


def test_how_a_job_was_run_is_never_an_axis(tmp_path: Path):
    """A resumed job records ckpt_path=last, make reproduce adds trainer.progress_bar=false
    to the jobs it runs but not to the N/A cells it records: the layout stays Table 8."""
    pos = {"model.pos_embed.kind": "learned_1d", "model.pos_embed.placement": "stem"}
    write_run(tmp_path, 0, {**pos, "seed": 0, "ckpt_path": "last"}, fewshot=0.5)
    write_run(tmp_path, 1, {**pos, "seed": 1, "trainer.progress_bar": False}, fewshot=0.7)
    write_run(tmp_path, 2, {**pos, "model.pos_embed.kind": "none", "seed": 0}, fewshot=0.4)
    jobs = collect(tmp_path)
    axes, recorded = find_axes(jobs)
    assert axes == ["model.pos_embed.kind"] and choose_view(axes, recorded, jobs) == "table8"
    assert report(tmp_path).cells[("learned_1d", "stem")].mean == pytest.approx(0.6)


def test_the_control_table_and_the_probe_sentence(tmp_path: Path):
    """Jobs that recorded their random initialisation's score get a control table and the
    rule's sentence; a cell without a control makes the probe unable to tell."""
    sweep = tmp_path / "sweep"
    for num, (seed, value, init) in enumerate([(0, 0.60, 0.50), (1, 0.62, 0.51), (2, 0.61, 0.49)]):
        write_job(sweep, num, "learned_1d", "stem", seed, value)
        record = json.loads((sweep / str(num) / "results.json").read_text())
        record["fewshot_init"] = {"digits/10shot": init}
        (sweep / str(num) / "results.json").write_text(json.dumps(record))
    report(sweep)
    text = (sweep / "table.md").read_text()
    assert "Random-init control" in text and "init 0.5000, gain +0.1100 ± 0.0058" in text
    assert "The probe tells: all 1 trained cells beat their random initialisation" in text
    write_job(sweep, 3, "none", "stem", 0, 0.40)  # a cell without a control
    report(sweep)
    assert "The probe cannot tell: 1 of 2 trained cells" in (sweep / "table.md").read_text()
