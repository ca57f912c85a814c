"""The recipes study of `python -m vitexp.reproduce --studies recipes`: what AugReg's
augmentation levels and a weight average do on the embedded data.

    recipes/<augment=L,seed=S>/           pretraining (configs/experiment/augreg_sweep.yaml)
    recipes_finetune/<augment=L,seed=S>/  that model fine-tuned on digits (FINETUNE)
    recipes/recipes.md                    the table below, mean ± std over seeds

Every run keeps an EMA that only watches the training, so each reports its trained and its
averaged weights side by side (results.json `metrics_raw` / `fewshot_raw`): the average's
effect is measured on the same runs, seed for seed. The fine-tunes start from the trained
(not averaged) pretraining weights, so the augmentation columns do not mix in the average.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PRESET = "augreg_sweep"
SEEDS = 3
# the quickstart's fine-tuning at 300 steps: where pretraining counts most (300 steps:
# pretrained 96.3 % vs scratch 82.6 % digits val; 1000 steps: 98.6 vs 97.9 %)
FINETUNE = [
    "+experiment=quickstart_finetune",
    "pretrained_weights=raw",
    "ema.decay=0.99",
    "ema.warmup=true",
    "trainer.max_steps=300",
    "trainer.val_check_interval=150",
]
LEVELS = ("none", "light", "medium", "heavy")
COLUMNS = (  # (header, study dir, results.json path)
    ("few-shot, trained", "recipes", ("fewshot_raw", "digits/10shot")),
    ("few-shot, EMA", "recipes", ("fewshot", "digits/10shot")),
    ("shapes test, trained", "recipes", ("metrics_raw", "test/acc")),
    ("shapes test, EMA", "recipes", ("metrics", "test/acc")),
    ("digits fine-tuned, trained", "recipes_finetune", ("metrics_raw", "test/acc")),
    ("digits fine-tuned, EMA", "recipes_finetune", ("metrics", "test/acc")),
)


def level_of(job_name: str) -> str:
    """`augment=medium,seed=1` -> medium."""
    return dict(part.split("=", 1) for part in job_name.split(","))["augment"]


def scores(out: Path, study: str, path: tuple[str, str]) -> dict[str, list[float]]:
    """Each level's values of one results.json entry, over the finished seeds."""
    found: dict[str, list[float]] = {}
    for results in sorted((out / study).glob("*/results.json")):
        r = json.loads(results.read_text())
        value = (r.get(path[0]) or {}).get(path[1])
        if value is not None:
            found.setdefault(level_of(results.parent.name), []).append(float(value))
    return found


def table(out: Path) -> list[tuple[str, list[list[float]]]]:
    """(level, each column's values over seeds) for the levels that have any result."""
    columns = [scores(out, study, path) for _, study, path in COLUMNS]
    return [
        (level, [c.get(level, []) for c in columns])
        for level in LEVELS
        if any(level in c for c in columns)
    ]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std over seeds (None where there are too few)."""
    mean = float(np.mean(values)) if values else None
    return mean, float(np.std(values, ddof=1)) if len(values) > 1 else None


def markdown(out: Path) -> str:
    def cell(values: list[float]) -> str:
        mean, std = mean_std(values)
        if mean is None:
            return "N/A"
        return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "") + f" ({len(values)})"

    head = "| augment | " + " | ".join(h for h, _, _ in COLUMNS) + " |\n"
    head += "|---" * (len(COLUMNS) + 1) + "|\n"
    body = "".join(
        f"| {level} | " + " | ".join(cell(v) for v in values) + " |\n"
        for level, values in table(out)
    )
    return (
        head + body + "\nmean ± std over seeds (number of seeds); few-shot: digits 10-shot linear; "
        "EMA: the weight average (decay 0.99, warmup) of the same runs.\n"
    )
