"""`python -m vitexp.reproduce --studies recipes`: the AugReg levels x seeds, each
pretraining fine-tuned after it, and the table of trained vs averaged weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_config import compose_cfg
from vitexp.analysis import recipes
from vitexp.config import validate
from vitexp.reproduce import plan


def test_the_augreg_levels_compose_as_augreg_names_them():
    """none / light / medium / heavy = AugReg's none / light1 / medium1 / strong2, with the
    data config's crop and flip kept (shapes has neither: they would move the quadrant)."""
    want = {"none": (0, 0.0), "light": (2, 0.0), "medium": (2, 0.2), "heavy": (2, 0.8)}
    for level, (ops, mixup) in want.items():
        c = validate(compose_cfg(["+experiment=augreg_sweep", f"data/augment={level}"]))
        a = c.data.augment
        assert (a.randaugment.num_ops, a.mixup_alpha) == (ops, mixup), level
        assert not a.random_resized_crop and not a.hflip
        assert c.ema.decay == 0.99 and c.ema.warmup
    digits = validate(compose_cfg(["data/augment=medium"])).data.augment
    assert digits.random_resized_crop and digits.randaugment.magnitude == 30


def test_the_recipes_study_fine_tunes_each_pretraining_after_it(tmp_path: Path):
    jobs = plan(tmp_path, seeds=2, studies=("recipes",))
    pretrain = [j for j in jobs if j.study == "recipes"]
    finetune = [j for j in jobs if j.study == "recipes_finetune"]
    assert len(pretrain) == len(finetune) == 4 * 2
    assert {j.name for j in pretrain} == {
        f"augment={a},seed={s}" for a in recipes.LEVELS for s in (0, 1)
    }
    for ft in finetune:
        assert ft.after == f"recipes/{ft.name}"
        assert f"pretrained='{tmp_path / 'recipes' / ft.name}'" in ft.overrides
        assert ft.overrides[-1] == "seed=" + ft.name.rsplit("=", 1)[1]
        assert "pretrained_weights=raw" in ft.overrides
    assert not any(j.study == "recipes" for j in plan(tmp_path, seeds=1))  # opt-in only


def write(out: Path, study: str, name: str, record: dict) -> None:
    (out / study / name).mkdir(parents=True)
    (out / study / name / "results.json").write_text(json.dumps(record))


def test_the_table_pairs_trained_and_averaged_weights_per_level(tmp_path: Path):
    for seed, shift in ((0, 0.0), (1, 0.02)):
        write(
            tmp_path,
            "recipes",
            f"augment=none,seed={seed}",
            {
                "fewshot": {"digits/10shot": 0.60 + shift},
                "fewshot_raw": {"digits/10shot": 0.50 + shift},
                "metrics": {"test/acc": 0.7},
                "metrics_raw": {"test/acc": 0.6},
            },
        )
    write(
        tmp_path,
        "recipes_finetune",
        "augment=heavy,seed=0",
        {"metrics": {"test/acc": 0.97}, "metrics_raw": {"test/acc": 0.95}},
    )
    rows = dict(recipes.table(tmp_path))
    assert list(rows) == ["none", "heavy"]
    fewshot_trained, fewshot_ema = rows["none"][0], rows["none"][1]
    assert fewshot_trained == pytest.approx([0.50, 0.52]) and fewshot_ema == pytest.approx(
        [0.60, 0.62]
    )
    assert rows["heavy"][4:] == [[0.95], [0.97]] and rows["heavy"][0] == []
    text = recipes.markdown(tmp_path)
    assert "| none | 0.510 ± 0.014 (2) | 0.610 ± 0.014 (2) | 0.600 ± 0.000 (2)" in text
    assert "| heavy | N/A | N/A | N/A | N/A | 0.950 (1) | 0.970 (1) |" in text


def test_the_report_tables_an_augreg_sweep_by_level(tmp_path: Path):
    """`python -m vitexp.report` on the augreg_sweep multirun: one row per level (`none` is
    the option's name, not null), seeds averaged within a level only."""
    from vitexp.analysis.tables import summarise_sweep

    for i, (level, seed, score) in enumerate(
        [("none", 0, 0.5), ("none", 1, 0.7), ("heavy", 0, 0.2), ("heavy", 1, 0.4)]
    ):
        (tmp_path / str(i)).mkdir()
        record = {
            "status": "done",
            "seed": seed,
            "fewshot_report": "digits/10shot",
            "fewshot": {"digits/10shot": score},
            "metrics": {"test/acc": score},
            "overrides": ["+experiment=augreg_sweep", f"data/augment={level}", f"seed={seed}"],
        }
        (tmp_path / str(i) / "results.json").write_text(json.dumps(record))
    summary = summarise_sweep(tmp_path)
    assert summary.view == "table"
    assert "| none | 0.6000 ± 0.1414 |" in summary.table
    assert "| heavy | 0.3000 ± 0.1414 |" in summary.table
    assert "null" not in summary.table
