"""`python -m vitexp.report MULTIRUN_DIR`: a position-embedding sweep as the paper's Table 8.

Reads every job directory of the sweep (results.json, failed.json, or only config.yaml for a
job still running or killed), and writes into MULTIRUN_DIR:

    table.md   the paper's layout: rows none / 1-D / 2-D / relative (+ sin-cos if swept),
               columns stem / every layer / every layer shared, N/A where the paper has N/A,
               mean ± std over seeds; running / failed / not run cells say so
    table.csv  one row per cell: kind, placement, status, mean, std, n, seeds
    table.png  the same numbers as bars with their spread
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vitexp.cli import run_cli
from vitexp.errors import ConfigError
from vitexp.files import write_atomic
from vitexp.models.pos_embed import STEM_ONLY_KINDS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROWS = {
    "none": "No Pos. Emb.",
    "learned_1d": "1-D Pos. Emb.",
    "learned_2d": "2-D Pos. Emb.",
    "relative": "Rel. Pos. Emb.",
    "sincos_2d": "2-D sin-cos (beyond the paper)",
}
COLUMNS = {
    "stem": "Default/Stem",
    "every_layer": "Every Layer",
    "every_layer_shared": "Every Layer-Shared",
}
# One colour per placement, whatever cells a (partial) sweep has.
COLOURS = {"stem": "C0", "every_layer": "C1", "every_layer_shared": "C2"}
# The paper's Table 8 (ViT-B/16, few-shot accuracy), as the lecture quotes it.
PAPER = {
    ("none", "stem"): 0.61382,
    ("learned_1d", "stem"): 0.64206,
    ("learned_1d", "every_layer"): 0.63964,
    ("learned_1d", "every_layer_shared"): 0.64292,
    ("learned_2d", "stem"): 0.64001,
    ("learned_2d", "every_layer"): 0.64046,
    ("learned_2d", "every_layer_shared"): 0.64022,
    ("relative", "stem"): 0.64032,
}


@dataclass
class Job:
    kind: str
    placement: str
    seed: int
    status: str  # done | n/a | failed | running
    value: float | None = None
    metric: str | None = None
    steps: int | None = None
    wall_time_s: float | None = None


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None


def read_job(job_dir: Path) -> Job | None:
    """One job's record; None for a directory that is not a job."""
    for name in ("results.json", "failed.json"):
        path = job_dir / name
        if path.is_file():
            r = json.loads(path.read_text())
            status = r.get("status", "done") if name == "results.json" else "failed"
            metric = r.get("fewshot_report")
            value = (r.get("fewshot") or {}).get(metric) if metric else None
            pos = r["pos_embed"]
            return Job(
                pos["kind"],
                pos["placement"],
                int(r.get("seed", 0)),
                status,
                value,
                metric,
                r.get("steps"),
                r.get("wall_time_s"),
            )
    config = job_dir / "config.yaml"
    if config.is_file():  # started, not finished: running, or killed without a record
        from omegaconf import OmegaConf

        c = OmegaConf.load(config)
        pos = c.model.pos_embed
        return Job(pos.kind, pos.placement, int(c.seed), "running")
    return None


def collect(sweep_dir: Path) -> list[Job]:
    if not sweep_dir.is_dir():
        raise ConfigError(f"{sweep_dir} is not a directory; give a sweep's multirun directory")
    jobs = [job for d in sorted(sweep_dir.iterdir()) if d.is_dir() and (job := read_job(d))]
    if not jobs:
        raise ConfigError(f"{sweep_dir} holds no sweep jobs (no */results.json or */config.yaml)")
    return jobs


def summarise(jobs: list[Job]) -> tuple[dict[tuple[str, str], Cell], str | None]:
    cells: dict[tuple[str, str], Cell] = defaultdict(Cell)
    metrics = Counter(j.metric for j in jobs if j.metric)
    for j in jobs:
        cell = cells[(j.kind, j.placement)]
        cell.statuses[j.status] += 1
        if j.status == "done" and j.value is not None:
            cell.values.append(j.value)
            cell.seeds.append(j.seed)
    return cells, (metrics.most_common(1)[0][0] if metrics else None)


def cell_text(kind: str, placement: str, cell: Cell | None) -> str:
    if kind in STEM_ONLY_KINDS and placement != "stem":
        return "N/A"
    if cell is None:
        return "not run"
    parts = []
    if cell.values:
        text = f"{cell.mean:.4f}"
        if cell.std is not None:
            text += f" ± {cell.std:.4f}"
        parts.append(text)
    for status in ("running", "failed"):
        if cell.statuses[status]:
            parts.append(f"{status} ({cell.statuses[status]})" if cell.values else status)
    return ", ".join(parts) or "not run"


def rows_in(cells: dict) -> list[str]:
    return [k for k in ROWS if k != "sincos_2d" or any(key[0] == k for key in cells)]


def markdown(cells: dict, metric: str | None, jobs: list[Job]) -> str:
    done = [j for j in jobs if j.status == "done"]
    seeds = sorted({j.seed for j in done})
    lines = [
        f"Few-shot linear accuracy ({metric or 'no finished job yet'}), mean ± std over "
        f"seeds {seeds}; {len(done)} trained jobs.",
        "",
        "| Pos. Emb. | " + " | ".join(COLUMNS.values()) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for kind in rows_in(cells):
        row = [cell_text(kind, p, cells.get((kind, p))) for p in COLUMNS]
        lines.append(f"| {ROWS[kind]} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def csv_text(cells: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["kind", "placement", "status", "mean", "std", "n", "seeds", "paper"])
    for kind in rows_in(cells):
        for placement in COLUMNS:
            cell = cells.get((kind, placement))
            status = cell_text(kind, placement, cell) if not (cell and cell.values) else "done"
            writer.writerow(
                [
                    kind,
                    placement,
                    status,
                    "" if not cell or cell.mean is None else f"{cell.mean:.6f}",
                    "" if not cell or cell.std is None else f"{cell.std:.6f}",
                    len(cell.values) if cell else 0,
                    " ".join(map(str, sorted(cell.seeds))) if cell else "",
                    PAPER.get((kind, placement), ""),
                ]
            )
    return out.getvalue()


def table_figure(cells: dict, metric: str | None) -> Figure:
    """The table as a matplotlib Figure: bars (mean, std) per kind, one colour per placement."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    kinds = rows_in(cells)
    fig = Figure(figsize=(8, 4), layout="tight")
    ax = fig.subplots()
    width = 0.8 / len(COLUMNS)
    for i, (placement, label) in enumerate(COLUMNS.items()):
        xs, means, errs = [], [], []
        for x, kind in enumerate(kinds):
            cell = cells.get((kind, placement))
            if cell and cell.values:
                xs.append(x + (i - 1) * width)
                means.append(cell.mean)
                errs.append(cell.std or 0.0)
        ax.bar(xs, means, width, yerr=errs, capsize=3, color=COLOURS[placement], label=label)
    ax.set_xticks(range(len(kinds)), [ROWS[k].replace(" (beyond the paper)", "") for k in kinds])
    ax.set_ylabel(f"few-shot accuracy ({metric})" if metric else "few-shot accuracy")
    ax.set_title("Position-embedding ablation (paper's Table 8); N/A cells are absent")
    # every placement in the legend, drawn or not (an empty bar set has no colour to show)
    ax.legend(
        handles=[Patch(color=COLOURS[p], label=label) for p, label in COLUMNS.items()], fontsize=8
    )
    return fig


def report(sweep_dir: str | Path) -> dict[tuple[str, str], Cell]:
    """Write table.md, table.csv and table.png for a sweep; returns the cells."""
    sweep_dir = Path(sweep_dir)
    jobs = collect(sweep_dir)
    cells, metric = summarise(jobs)
    table = markdown(cells, metric, jobs)
    write_atomic(sweep_dir / "table.md", table)
    write_atomic(sweep_dir / "table.csv", csv_text(cells))
    table_figure(cells, metric).savefig(sweep_dir / "table.png", dpi=120)
    print(table + f"-> {sweep_dir}/table.md, table.csv, table.png")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "sweep_dir", help="a multirun directory, e.g. multirun/ablation_posemb/<date>"
    )
    args = parser.parse_args()
    run_cli(lambda: report(args.sweep_dir))


if __name__ == "__main__":
    main()
