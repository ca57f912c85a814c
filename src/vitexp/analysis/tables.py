"""A sweep's table and chart, laid out by what it swept: `python -m vitexp.report MULTIRUN_DIR`
runs `report`, and `vitexp.reproduce` runs it on each of its studies.

Reads every job directory of the sweep (results.json, failed.json, or only config.yaml for a
job still running or killed) and finds the swept axes from the jobs themselves: the keys of
their Hydra task overrides (`"overrides"` in each record) whose values differ between jobs.
`seed` is the replicate axis: the mean ± std are over seeds, and jobs that differ in any
other axis are never averaged together. Then it writes into MULTIRUN_DIR:

    table.md   the table (also printed)
    table.csv  one row per cell: its axis values, status, mean, std, n, seeds, ...
    table.png  the chart
    resolution.csv, resolution.png   where jobs have resolutions.json (vitexp.evaluate):
               accuracy against the test resolution per variant, mean ± s.e. over seeds

laid out by the axes:

- position-embedding kind and/or placement: the paper's Table 8, rows none / 1-D / 2-D /
  relative (+ sin-cos if swept), columns stem / every layer / every layer shared, N/A where
  the paper has N/A; running / failed / not run cells say so; the chart: bars with their
  spread. Also a sweep whose records predate `overrides`.
- `data.subset` among them: the paper's Figure 4, the few-shot accuracy against the number
  of pretraining images (`train_images`, log axis), one line per value of the other axes
  (e.g. `model`); the table adds the test accuracy on dataset A.
- anything else: one row per combination of axis values (few-shot accuracy, or the test
  accuracy when no job has one), with the number of seeds and of failed jobs.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitexp.analysis import resolution
from vitexp.analysis.claims import gain, probe_tells
from vitexp.analysis.recipes import mean_std as seed_mean_std
from vitexp.data.files import write_atomic
from vitexp.errors import ConfigError
from vitexp.models.pos_embed import STEM_ONLY_KINDS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROWS = {
    "none": "No Pos. Emb.",
    "learned_1d": "1-D Pos. Emb.",
    "learned_2d": "2-D Pos. Emb.",
    "relative": "Rel. Pos. Emb.",
    "sincos_2d": "2-D sin-cos (beyond the paper)",
    "rope_axial": "RoPE-Axial (beyond the paper)",
    "rope_mixed": "RoPE-Mixed (beyond the paper)",
    "rope_axial_ape": "RoPE-Axial + APE (beyond the paper)",
    "rope_mixed_ape": "RoPE-Mixed + APE (beyond the paper)",
    "relative_2d": "2-D rel. bias (beyond the paper)",
    "conditional": "Conditional PEG (beyond the paper)",
}
PAPER_ROWS = ("none", "learned_1d", "learned_2d", "relative")  # always shown, run or not
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


# The keys of a sweep over position embeddings: the paper's Table 8 lays them out.
POS_AXES = ("model.pos_embed.kind", "model.pos_embed.placement", "model/pos_embed")
SEED = "seed"  # the replicate axis: averaged over, never drawn
# how a job was run, not what it measured: never an axis (a resumed job adds ckpt_path=last)
RUN_KEYS = ("ckpt_path", "trainer.progress_bar", "output_root")
SUBSET = "data.subset"  # the data-size axis: the paper's Figure 4
UNKNOWN = object()  # an axis value a running job's config.yaml does not hold


@dataclass
class Job:
    kind: str | None
    placement: str | None
    seed: int
    status: str  # done | n/a | failed | running
    value: float | None = None
    metric: str | None = None
    steps: int | None = None
    wall_time_s: float | None = None
    # the job's task overrides, {key: value} (values parsed, `+` prefixes dropped, no seed);
    # None when its record has none: a running job (config.yaml only) or an older record
    overrides: dict[str, object] | None = None
    test_acc: float | None = None
    train_images: int | None = None
    model: str | None = None
    data: str | None = None
    config: object = field(default=None, repr=False)  # a running job's config.yaml
    axes: dict[str, object] = field(default_factory=dict)  # its value of each swept axis
    control: float | None = None  # the same probe on the job's random initialisation


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    test_accs: list[float] = field(default_factory=list)
    train_images: list[int] = field(default_factory=list)
    controls: list[float] = field(default_factory=list)  # per seed, where recorded
    gains: list[float] = field(default_factory=list)  # value - control, paired by seed

    @property
    def mean(self) -> float | None:
        return seed_mean_std(self.values)[0]

    @property
    def std(self) -> float | None:
        return seed_mean_std(self.values)[1]

    @property
    def test_mean(self) -> float | None:
        return seed_mean_std(self.test_accs)[0]

    @property
    def test_std(self) -> float | None:
        return seed_mean_std(self.test_accs)[1]

    @property
    def images(self) -> int | None:
        """The number of pretraining images (the most common one over the cell's jobs)."""
        return Counter(self.train_images).most_common(1)[0][0] if self.train_images else None


def parse_value(text: object) -> object:
    """An override's value as a comparable Python value: `1e-3` and `0.001` are equal, as are
    `true` and a config's True; a list becomes a tuple."""
    if isinstance(text, (list, tuple)):
        return tuple(parse_value(v) for v in text)
    if isinstance(text, dict):  # hashable, whatever the key order
        return tuple(sorted((str(k), parse_value(v)) for k, v in text.items()))
    if not isinstance(text, str):
        return text
    s = text.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":  # a quoted string
        return s[1:-1]
    if s.lower() in ("null", "none"):
        return None
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    for number in (int, float):
        try:
            return number(s)
        except ValueError:
            pass
    if s.startswith("["):
        import yaml

        try:
            loaded = yaml.safe_load(s)
        except yaml.YAMLError:
            return s
        return parse_value(loaded) if isinstance(loaded, list) else s
    return s


def show(value: object) -> str:
    """An axis value as the table writes it."""
    if value is UNKNOWN:
        return "?"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)  # 1e-3 -> 0.001; a fraction 1.0 stays 1.0 (not 1, one image)
    if isinstance(value, tuple):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def natural(value: object) -> tuple:
    """Sort key: numbers by size, then text, then null and unknown."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    if value is None or value is UNKNOWN:
        return (2, 0, "")
    return (1, 0, show(value))


def parse_overrides(items: list[str]) -> tuple[dict[str, object], object]:
    """Hydra task overrides (["model=vit_b16", "data.subset=1000", "seed=1"]) as
    ({key: value}, seed); `+`, `++` and `~` prefixes dropped, hydra.* left out."""
    overrides: dict[str, object] = {}
    seed = None
    for item in items:
        key, has_value, value = str(item).partition("=")
        key = key.lstrip("+~").strip()
        if not key or key.startswith("hydra."):
            continue
        if key == SEED:
            seed = parse_value(value)
        elif not has_value:  # `~key` deletes a key: a value of its own
            overrides[key] = "<deleted>"
        elif "/" in key:  # a nested group's option (data/augment=none): a name, as written
            overrides[key] = value.strip()
        else:
            overrides[key] = parse_value(value)
    return overrides, seed


def config_value(config: object, key: str) -> object:
    """An axis's value in a job's config.yaml: `optim.lr` is a key; a group choice
    (`model=vit_b16`, `model/pos_embed=none`, `data@fewshot.data=cifar10`) is the group's
    `name` (or `kind`). UNKNOWN when the config does not say."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    path = key.split("@", 1)[1] if "@" in key else key.replace("/", ".")
    try:
        node = OmegaConf.select(config, path, default=UNKNOWN)
    except Exception:  # a missing (???) or broken value: the config does not say
        return UNKNOWN
    if isinstance(node, DictConfig):
        for name in ("name", "kind"):
            if name in node:
                return parse_value(node[name])
        return UNKNOWN
    if isinstance(node, ListConfig):
        return parse_value(OmegaConf.to_container(node))
    return parse_value(node)


def read_job(job_dir: Path) -> Job | None:
    """One job's record; None for a directory that is not a job."""
    for name in ("results.json", "failed.json"):
        path = job_dir / name
        if path.is_file():
            r = json.loads(path.read_text())
            status = r.get("status", "done") if name == "results.json" else "failed"
            metric = r.get("fewshot_report")
            value = (r.get("fewshot") or {}).get(metric) if metric else None
            control = (r.get("fewshot_init") or {}).get(metric) if metric else None
            pos = r.get("pos_embed") or {}
            overrides, override_seed = None, None
            if "overrides" in r:
                overrides, override_seed = parse_overrides(r["overrides"] or [])
            seed = r.get("seed", override_seed if isinstance(override_seed, int) else 0)
            images = r.get("train_images")
            return Job(
                pos.get("kind"),
                pos.get("placement"),
                int(seed),
                status,
                value,
                metric,
                r.get("steps"),
                r.get("wall_time_s"),
                overrides=overrides,
                test_acc=(r.get("metrics") or {}).get("test/acc"),
                train_images=int(images) if isinstance(images, (int, float)) else None,
                model=r.get("model"),
                data=r.get("data"),
                control=control,
            )
    config = job_dir / "config.yaml"
    if config.is_file():  # started, not finished: running, or killed without a record
        from omegaconf import OmegaConf

        c = OmegaConf.load(config)
        seed = OmegaConf.select(c, SEED, default=0)
        return Job(
            OmegaConf.select(c, "model.pos_embed.kind", default=None),
            OmegaConf.select(c, "model.pos_embed.placement", default=None),
            int(seed) if isinstance(seed, int) else 0,
            "running",
            model=OmegaConf.select(c, "model.name", default=None),
            data=OmegaConf.select(c, "data.name", default=None),
            config=c,
        )
    return None


def collect(sweep_dir: Path) -> list[Job]:
    if not sweep_dir.is_dir():
        raise ConfigError(f"{sweep_dir} is not a directory; give a sweep's multirun directory")
    jobs = [job for d in sorted(sweep_dir.iterdir()) if d.is_dir() and (job := read_job(d))]
    if not jobs:
        raise ConfigError(f"{sweep_dir} holds no sweep jobs (no */results.json or */config.yaml)")
    return jobs


def legacy_overrides(job: Job) -> dict[str, object]:
    """What a record without `overrides` (written before vitexp recorded them) stands for."""
    known = {
        "model.pos_embed.kind": job.kind,
        "model.pos_embed.placement": job.placement,
        "model": job.model,
        "data": job.data,
    }
    return {k: v for k, v in known.items() if v is not None}


def find_axes(jobs: list[Job]) -> tuple[list[str], bool]:
    """The swept axes (seed left out), in the order the overrides name them, and whether any
    record carries its overrides. Sets each job's `axes`.

    An axis is an override key whose value differs between jobs. A job without a record
    (config.yaml only) takes its values from its config.yaml (`optim.lr`, or the group's
    name for `model=...`); a record without `overrides` (older vitexp) stands for its
    position embedding, model and data."""
    recorded = any(j.overrides is not None for j in jobs)
    keys: dict[str, None] = {}
    for j in jobs:
        if j.overrides is not None:
            keys.update(dict.fromkeys(k for k in j.overrides if k not in RUN_KEYS))
        elif j.config is None:
            keys.update(dict.fromkeys(legacy_overrides(j)))
    if not recorded and not keys:  # nothing but running jobs of an older sweep
        keys = dict.fromkeys(POS_AXES[:2])
    for j in jobs:
        if j.overrides is not None:
            j.axes = {k: j.overrides.get(k) for k in keys}
        elif j.config is not None:
            j.axes = {k: config_value(j.config, k) for k in keys}
        else:
            legacy = legacy_overrides(j)
            j.axes = {k: legacy.get(k, UNKNOWN) for k in keys}
    axes = []
    for key in keys:
        values = {j.axes[key] for j in jobs if j.axes[key] is not UNKNOWN}
        if len(values) > 1:
            axes.append(key)
    return axes, recorded


def choose_view(axes: list[str], recorded: bool, jobs: list[Job]) -> str:
    """table8: every axis is a position-embedding key, and the sweep is about position
    embeddings (it swept them, set them in its overrides, or predates recorded overrides);
    scaling: `data.subset` is an axis; table: anything else."""
    if SUBSET in axes:
        return "scaling"
    named = any(k in POS_AXES for j in jobs for k in (j.overrides or {}))
    if all(a in POS_AXES for a in axes) and (axes or named or not recorded):
        return "table8"
    return "table"


def summarise(jobs: list[Job]) -> tuple[dict[tuple[str, str], Cell], str | None]:
    cells: dict[tuple[str, str], Cell] = defaultdict(Cell)
    metrics = Counter(j.metric for j in jobs if j.metric)
    for j in jobs:
        cell = cells[(j.kind, j.placement)]
        cell.statuses[j.status] += 1
        if j.status == "done" and j.value is not None:
            cell.values.append(j.value)
            cell.seeds.append(j.seed)
            if j.control is not None:
                cell.controls.append(j.control)
                cell.gains.append(j.value - j.control)
        if j.status == "done" and j.test_acc is not None:
            cell.test_accs.append(j.test_acc)
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
    return [k for k in ROWS if k in PAPER_ROWS or any(key[0] == k for key in cells)]


def markdown(cells: dict, metric: str | None, jobs: list[Job]) -> str:
    done = [j for j in jobs if j.status == "done"]
    seeds = sorted({j.seed for j in done})
    lines = [
        f"Few-shot linear accuracy ({metric or 'no finished job yet'}), mean ± std over "
        f"seeds {seeds}; {len(done)} trained jobs.",
        "",
        *grid(cells, cell_text),
    ]
    if any(c.controls for c in cells.values()):
        lines += [
            "",
            "Random-init control: the same probe on each run's own initialisation, and the "
            "trained run's gain over it (mean ± standard error over seeds).",
            "",
            *grid(cells, control_text),
        ]
    lines += ["", sentence(probe_tells(cells)[1])]
    return "\n".join(lines) + "\n"


def grid(cells: dict, text_of) -> list[str]:
    """Table 8's markdown rows (kinds x placements), each cell `text_of(kind, placement,
    cell)`."""
    lines = [
        "| Pos. Emb. | " + " | ".join(COLUMNS.values()) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for kind in rows_in(cells):
        row = [text_of(kind, p, cells.get((kind, p))) for p in COLUMNS]
        lines.append(f"| {ROWS[kind]} | " + " | ".join(row) + " |")
    return lines


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def control_text(kind: str, placement: str, cell: Cell | None) -> str:
    """`init 0.6312, gain +0.0512 ± 0.0100` of a Table-8 cell."""
    if kind in STEM_ONLY_KINDS and placement != "stem":
        return "N/A"
    if cell is None or not cell.controls:
        return "no control"
    return f"init {np.mean(cell.controls):.4f}, {gain_text(cell)}"


def gain_text(cell: Cell) -> str:
    g = gain(cell)
    return f"gain {g[0]:+.4f} ± {g[1]:.4f}" if g else f"gain {cell.gains[0]:+.4f} (1 seed)"


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
    labels = [ROWS[k].replace(" (beyond the paper)", "") for k in kinds]
    ax.set_xticks(range(len(kinds)), labels, rotation=25 if len(kinds) > 5 else 0, ha="right")
    ax.set_ylabel(f"few-shot accuracy ({metric})" if metric else "few-shot accuracy")
    ax.set_title("Position-embedding ablation (paper's Table 8); N/A cells are absent")
    # every placement in the legend, drawn or not (an empty bar set has no colour to show)
    ax.legend(
        handles=[Patch(color=COLOURS[p], label=label) for p, label in COLUMNS.items()], fontsize=8
    )
    return fig


@dataclass
class Summary:
    """A sweep other than Table 8: one cell per combination of the axes' values."""

    view: str  # scaling | table
    axes: list[str]  # the swept axes, seed left out; scaling: data.subset last
    metric: str  # the score: a few-shot key (e.g. digits/10shot), or test/acc
    cells: dict[tuple[str, ...], Cell]  # keyed by the axes' values as the table writes them
    jobs: list[Job]

    @property
    def lines(self) -> list[str]:
        """scaling: the axes that make one line each (all but data.subset)."""
        return self.axes[:-1] if self.view == "scaling" else self.axes

    @property
    def fewshot(self) -> bool:
        return self.metric != "test/acc"


def summarise_axes(jobs: list[Job], axes: list[str], view: str) -> Summary:
    """Group the jobs by every swept axis (never averaging across one), scores over seeds."""
    if view == "scaling":
        axes = [a for a in axes if a != SUBSET] + [SUBSET]
    metrics = Counter(j.metric for j in jobs if j.metric and j.value is not None)
    metric = ", ".join(m for m, _ in metrics.most_common()) if metrics else "test/acc"
    cells: dict[tuple[str, ...], Cell] = defaultdict(Cell)
    order: dict[tuple[str, ...], tuple] = {}
    for j in jobs:
        values = [j.axes.get(a, UNKNOWN) for a in axes]
        key = tuple(show(v) for v in values)
        order[key] = tuple(natural(v) for v in values)
        cell = cells[key]
        cell.statuses[j.status] += 1
        if j.status != "done":
            continue
        score = j.value if metrics else j.test_acc
        if score is not None:
            cell.values.append(score)
            cell.seeds.append(j.seed)
            if metrics and j.control is not None:
                cell.controls.append(j.control)
                cell.gains.append(score - j.control)
        if j.test_acc is not None:
            cell.test_accs.append(j.test_acc)
        images = j.train_images
        if images is None and view == "scaling":  # an older record: the subset, if a count
            subset = j.axes.get(SUBSET)
            images = subset if isinstance(subset, int) and not isinstance(subset, bool) else None
        if images is not None:
            cell.train_images.append(images)

    def sort_key(key: tuple[str, ...]) -> tuple:
        if view != "scaling":
            return order[key]
        images = cells[key].images
        return (*order[key][:-1], images is None, images or 0, order[key][-1])

    return Summary(view, axes, metric, {k: cells[k] for k in sorted(cells, key=sort_key)}, jobs)


def format_mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def score_text(cell: Cell) -> str:
    """The score's cell: mean ± std, or what became of the jobs that have none."""
    if cell.values:
        return format_mean_std(cell.mean, cell.std)
    for status, text in (("running", "running"), ("failed", "failed"), ("n/a", "N/A")):
        if cell.statuses[status]:
            return text
    return "no score"


def cell_status(cell: Cell) -> str:
    if cell.values:
        return "done"
    return cell.statuses.most_common(1)[0][0] if cell.statuses else "not run"


def axes_markdown(s: Summary) -> str:
    """The table of a scaling or plain sweep."""
    done = [j for j in s.jobs if j.status == "done"]
    seeds = sorted({j.seed for j in done})
    count = Counter(j.status for j in s.jobs)
    what = "Few-shot linear accuracy" if s.fewshot else "Test accuracy"
    what += f" ({s.metric})"
    if s.view == "scaling":
        what += " against the number of pretraining images (the paper's Figure 4)"
    running = count["running"] > 0
    na = count["n/a"] > 0
    extra = "".join(f", {count[k]} {k}" for k in ("failed", "running", "n/a") if count[k])
    head = [*s.axes]
    if s.view == "scaling":
        head.append("train images")
    head.append(s.metric)
    controls = any(c.controls for c in s.cells.values())
    head += ["random init", "gain over it"] * controls
    if s.fewshot:
        head.append("test/acc")
    head += ["n", "seeds", "failed"] + ["running"] * running + ["n/a"] * na
    lines = [
        f"{what}, mean ± std over seeds {seeds}; {len(done)} trained jobs"
        f"{extra}. Swept: {', '.join(s.axes) or 'nothing but the seed'}.",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for key, cell in s.cells.items():
        row = list(key)
        if s.view == "scaling":
            row.append("" if cell.images is None else str(cell.images))
        row.append(score_text(cell))
        if controls:
            row += [f"{np.mean(cell.controls):.4f}", gain_text(cell)] if cell.controls else ["", ""]
        if s.fewshot:
            row.append(format_mean_std(cell.test_mean, cell.test_std))
        row += [str(len(cell.values)), " ".join(map(str, sorted(cell.seeds)))]
        row.append(str(cell.statuses["failed"]))
        row += [str(cell.statuses["running"])] * running + [str(cell.statuses["n/a"])] * na
        lines.append("| " + " | ".join(row) + " |")
    if s.fewshot:
        lines += ["", sentence(probe_tells(s.cells)[1])]
    return "\n".join(lines) + "\n"


def axes_csv(s: Summary) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    images = ["train_images"] if s.view == "scaling" else []
    writer.writerow(
        [*s.axes, *images, "status", "score", "mean", "std", "n", "seeds"]
        + ["test_acc_mean", "test_acc_std", "failed", "running"]
    )
    for key, cell in s.cells.items():
        writer.writerow(
            [*key]
            + ([cell.images if cell.images is not None else ""] if images else [])
            + [cell_status(cell), s.metric]
            + ["" if cell.mean is None else f"{cell.mean:.6f}"]
            + ["" if cell.std is None else f"{cell.std:.6f}"]
            + [len(cell.values), " ".join(map(str, sorted(cell.seeds)))]
            + ["" if cell.test_mean is None else f"{cell.test_mean:.6f}"]
            + ["" if cell.test_std is None else f"{cell.test_std:.6f}"]
            + [cell.statuses["failed"], cell.statuses["running"]]
        )
    return out.getvalue()


def label(axes: list[str], values: tuple[str, ...]) -> str:
    """A line's or a bar's name: the value alone for one axis, `key=value, ...` for more."""
    if len(axes) == 1:
        return values[0]
    return ", ".join(f"{a}={v}" for a, v in zip(axes, values, strict=True))


def score_label(s: Summary) -> str:
    return f"few-shot accuracy ({s.metric})" if s.fewshot else "test accuracy"


def scaling_figure(s: Summary) -> Figure:
    """The paper's Figure 4: the score against the pretraining images (log axis), one line
    per value of the other axes, mean ± std over seeds as error bars and a band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.subplots()
    lines: dict[tuple[str, ...], list[tuple[int, float, float]]] = defaultdict(list)
    for key, cell in s.cells.items():
        lines.setdefault(key[:-1], [])  # every setting keeps its colour, drawn or not
        if cell.values and cell.images is not None:
            lines[key[:-1]].append((cell.images, cell.mean, cell.std or 0.0))
    for i, (values, points) in enumerate(lines.items()):
        if not points:
            continue
        xs, means, stds = (np.array(v, dtype=float) for v in zip(*sorted(points), strict=True))
        name = label(s.lines, values) if s.lines else s.metric
        colour = f"C{i % 10}"
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, color=colour, label=name)
        ax.fill_between(xs, means - stds, means + stds, color=colour, alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("pretraining images (dataset A, log scale)")
    ax.set_ylabel(score_label(s))
    ax.set_title("Accuracy against pretraining data size (the paper's Figure 4)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(title=", ".join(s.lines) or None, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished job yet", ha="center", transform=ax.transAxes)
    return fig


def plain_figure(s: Summary) -> Figure:
    """One horizontal bar per setting (mean ± std over seeds); a setting without a score
    names what became of its jobs."""
    from matplotlib.figure import Figure

    keys = list(s.cells)
    fig = Figure(figsize=(8, max(2.5, 0.45 * len(keys) + 1.5)), layout="tight")
    ax = fig.subplots()
    for y, key in enumerate(keys):
        cell = s.cells[key]
        if cell.values:
            ax.barh(y, cell.mean, xerr=cell.std or 0.0, capsize=3, color="C0")
        else:
            ax.text(0, y, f" {score_text(cell)}", va="center", fontsize=8)
    ax.set_yticks(range(len(keys)), [label(s.axes, k) if s.axes else "all" for k in keys])
    ax.set_ylim(len(keys) - 0.5, -0.5)  # the table's order, top down, every row shown
    if len(s.axes) == 1:
        ax.set_ylabel(s.axes[0])
    ax.set_xlabel(score_label(s) + ", mean ± std over seeds")
    ax.set_title("Sweep over " + (", ".join(s.axes) or "seeds"))
    return fig


@dataclass
class SweepSummary:
    """One sweep, summarised in the view its axes call for, ready to write."""

    view: str  # table8 | scaling | plain
    cells: dict
    metric: str
    table: str  # markdown
    csv: str
    figure: Any


def summarise_sweep(sweep_dir: Path) -> SweepSummary:
    """Collect a sweep's jobs, find its axes and summarise it in the right view."""
    jobs = collect(sweep_dir)
    axes, recorded = find_axes(jobs)
    view = choose_view(axes, recorded, jobs)
    if view == "table8":
        cells, metric = summarise(jobs)
        table, figure = markdown(cells, metric, jobs), table_figure(cells, metric)
        return SweepSummary(view, cells, metric, table, csv_text(cells), figure)
    summary = summarise_axes(jobs, axes, view)
    figure = (scaling_figure if view == "scaling" else plain_figure)(summary)
    return SweepSummary(
        view, summary.cells, summary.metric, axes_markdown(summary), axes_csv(summary), figure
    )


def report(sweep_dir: str | Path) -> SweepSummary:
    """Write table.md, table.csv and table.png for a sweep (and, where its jobs have a
    resolutions.json, resolution.csv and resolution.png); returns its summary, whose cells
    are keyed by (kind, placement) for Table 8, else by the axes' values as the table
    writes them."""
    sweep_dir = Path(sweep_dir)
    s = summarise_sweep(sweep_dir)
    write_atomic(sweep_dir / "table.md", s.table)
    write_atomic(sweep_dir / "table.csv", s.csv)
    s.figure.savefig(sweep_dir / "table.png", dpi=120)
    print(s.table + f"-> {sweep_dir}/table.md, table.csv, table.png")
    if resolution.write_sweep(sweep_dir):  # jobs scored by vitexp.evaluate
        print(f"-> {sweep_dir}/resolution.csv, resolution.png (accuracy across test resolutions)")
    return s
