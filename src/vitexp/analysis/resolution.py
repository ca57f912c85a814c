"""Accuracy across test resolutions: a trained model scored at other resolutions (and patch
sizes) without fine-tuning, and a sweep's scores drawn against the resolution.

`evaluate_resolutions` is `python -m vitexp.evaluate`'s work: for each resolution r (and
patch size p) a fresh copy of the model is resized (`model.resize(r, patch_size=p,
rope_positions=...)`: position tables interpolated, patch projection resampled) and scored
on the test split of the run's own data (its config.yaml) or of another data config, with
the data pipeline's eval transform at r. The run's test is reproduced exactly: the same
split, transform, batches, weights (the average, where the run kept one) and precision, so
at the training resolution the accuracy is results.json's `test/acc`.

`write_sweep` is `vitexp.report`'s part: every job's resolutions.json in a sweep, averaged
over seeds per variant (mean and standard error), as resolution.csv and resolution.png.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vitexp.data.config import DataConfig, validate_data
from vitexp.data.files import write_atomic
from vitexp.errors import ConfigError
from vitexp.models.patch_embed import to_2tuple

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RESULTS = "resolutions.json"  # in a run directory, beside checkpoints/


# --- what the run did ------------------------------------------------------------------------
@dataclass
class RunData:
    """How the run's test was made: its data config, seed and test-loop settings."""

    data: DataConfig
    seed: int = 0
    precision: str = "32-true"
    limit_test_batches: Any = None


def run_data(run_dir: Path, data: DataConfig | None) -> RunData:
    """The run's data and test settings from its config.yaml; `data` (a data config given on
    the command line) replaces the run's data."""
    from omegaconf import OmegaConf

    from vitexp.config import TrainerConfig

    path = run_dir / "config.yaml"
    saved = OmegaConf.load(path) if path.is_file() else None
    if saved is None and data is None:
        raise ConfigError(
            f"{path} does not exist, so the run's data is unknown; give a data config: data=NAME"
        )
    try:
        if data is None:
            node = OmegaConf.merge(OmegaConf.structured(DataConfig), saved.data)
            data = OmegaConf.to_object(node)
        trainer = TrainerConfig()
        if saved is not None and "trainer" in saved:
            node = OmegaConf.merge(OmegaConf.structured(TrainerConfig), saved.trainer)
            trainer = OmegaConf.to_object(node)
    except Exception as err:  # noqa: BLE001 - a config.yaml of another version: say which
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{path} cannot be read: {first}; give a data config: data=NAME"
        ) from None
    validate_data(data)
    seed = int(saved.get("seed", 0)) if saved is not None else 0
    return RunData(data, seed, str(trainer.precision), trainer.limit_test_batches)


def only_the_test_split(data: DataConfig) -> DataConfig:
    """`data` with nothing but its test split worth building: generated `shapes` renders
    one train and one val image instead of every one at each resolution (image i of a split
    does not depend on the split sizes, so the test images are the run's)."""
    if data.source != "shapes":
        return data
    shapes = replace(data.shapes, num_train=1, num_val=1)
    return replace(data, shapes=shapes, subset=None)


# --- the checks before any image is read -----------------------------------------------------
def sizes(values: Any, key: str) -> list[Any]:
    """`resolutions=[24,32,[32,48]]` as a list of ints / [h, w] lists; one bad item is
    named."""
    items = (
        list(values) if isinstance(values, Sequence) and not isinstance(values, str) else [values]
    )
    if not items:
        raise ConfigError(f"{key}=[] is empty; give at least one, e.g. {key}=[24,32,48]")
    out = []
    for item in items:
        item = list(item) if isinstance(item, Sequence) and not isinstance(item, str) else item
        try:
            h, w = to_2tuple(item, key)
        except ValueError:
            raise ConfigError(
                f"{key}: {item!r} is not a size; use ints or [height, width]"
            ) from None
        if h < 1 or w < 1:
            raise ConfigError(f"{key}: {item!r} must be >= 1")
        out.append(item)
    return out


def resize_kwargs(patch_size: Any, rope_positions: str | None) -> dict[str, Any]:
    """`model.resize`'s optional arguments, only those given (a CNN takes neither)."""
    kwargs: dict[str, Any] = {}
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    if rope_positions is not None:
        kwargs["rope_positions"] = rope_positions
    return kwargs


def resized(model: nn.Module, resolution: Any, patch_size: Any, rope: str | None) -> nn.Module:
    """A fresh copy of `model` at `resolution` (and `patch_size`); a size the model cannot
    take (patches that do not tile it) is one ConfigError naming it."""
    copied = copy.deepcopy(model)
    try:
        copied.resize(resolution, **resize_kwargs(patch_size, rope))
    except (ValueError, TypeError) as err:  # TypeError: a CNN given a patch size
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        patch = "" if patch_size is None else f" with patch_size={patch_size}"
        raise ConfigError(f"resolution {resolution}{patch}: {text}") from None
    return copied.eval()


# --- scoring ---------------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    """The run's trainer.precision on this device (`auto` as vitexp.training resolves it)."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


TRUE_DTYPES = {"bf16-true": torch.bfloat16, "64-true": torch.float64}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def batches(loader: Any, limit: Any) -> Iterator[Any]:
    """The loader's batches up to `trainer.limit_test_batches` (an int: that many, a float:
    that fraction, as Lightning counts them)."""
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        yield from loader
        return
    total = int(limit) if isinstance(limit, int) else int(len(loader) * float(limit))
    for i, batch in enumerate(loader):
        if i >= total:
            return
        yield batch


def count_correct(model: nn.Module, dm: Any, device: torch.device, run: RunData) -> tuple[int, int]:
    """(correct, images) of top-1 predictions on `dm`'s test split, as the run's
    `trainer.test` counts them (torchmetrics' micro accuracy: argmax == label)."""
    precision = resolve_precision(run.precision, device)
    dtype = TRUE_DTYPES.get(precision)
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    correct = total = 0
    with torch.inference_mode(), autocast(precision, device):
        for batch in batches(dm.test_dataloader(), run.limit_test_batches):
            batch = dm.on_before_batch_transfer(batch, 0)
            batch = dm.transfer_batch_to_device(batch, device, 0)
            images, labels = dm.on_after_batch_transfer(batch, 0)
            logits = model(images.to(dtype) if dtype else images)
            correct += int((logits.argmax(-1) == labels).sum())
            total += int(labels.numel())
    return correct, total


def evaluate_resolutions(
    model: nn.Module,
    run: RunData,
    resolutions: list[Any],
    patch_sizes: list[Any] | None,
    rope_positions: str | None,
    device: torch.device,
) -> list[dict[str, Any]]:
    """One record per (resolution, patch size): accuracy, correct, n. Every size is checked
    on a copy of the model before any image is read."""
    from vitexp.data import ImageDataModule

    if patch_sizes is not None and not hasattr(model, "patch_embed"):
        raise ConfigError(f"patch_sizes applies to patch models; this is a {model.cfg.name}")
    train_patch = getattr(model.cfg, "patch_size", None)
    combos = [(r, p) for r in resolutions for p in (patch_sizes or [None])]
    for r, p in combos:
        resized(model, r, p, rope_positions)  # fail now, not after hours of scoring
    records = []
    mean, std = model.cfg.mean, model.cfg.std
    for r in resolutions:
        size = to_2tuple(r, "resolution")
        dm = ImageDataModule(only_the_test_split(run.data), size, mean, std, run.seed)
        dm.setup("test")
        if dm.num_classes != model.num_classes:
            raise ConfigError(
                f"data={run.data.name} has {dm.num_classes} classes but the model's head "
                f"{model.num_classes}; score it on the data it was trained on"
            )
        for p in patch_sizes or [None]:
            correct, n = count_correct(resized(model, r, p, rope_positions), dm, device, run)
            records.append(
                {
                    "resolution": r,
                    "patch_size": train_patch if p is None else p,
                    "accuracy": correct / n if n else None,
                    "correct": correct,
                    "n": n,
                }
            )
    return records


def result_line(record: dict[str, Any], train: tuple[Any, Any]) -> str:
    r, p = record["resolution"], record["patch_size"]
    at_train = (to_2tuple(r, "resolution"), p) == train
    acc = "n/a" if record["accuracy"] is None else f"{record['accuracy']:.4f}"
    return f"resolution {r}, patch {p}: accuracy {acc} ({record['correct']}/{record['n']})" + (
        " <- training resolution" if at_train else ""
    )


# --- a sweep's resolutions.json, for vitexp.report -------------------------------------------
def variant_label(record: dict[str, Any]) -> str:
    """The position-embedding cell as the paper names it (`1-D / stem`), else the model."""
    from vitexp.models.pos_embed import PosEmbedSpec, describe

    v = record.get("variant")
    if not v:
        return str(record.get("model") or "no position embedding")
    # RoPE scored with its positions squeezed into the trained range is a line of its own
    policy = " (interpolated)" if record.get("rope_positions") == "interpolate" else ""
    try:
        return describe(PosEmbedSpec(kind=v["kind"], placement=v["placement"])) + policy
    except (KeyError, ValueError, TypeError):
        return f"{v.get('kind')} / {v.get('placement')}{policy}"


def show_size(value: Any) -> str:
    """A resolution or patch size as a CSV cell: `32`, or `32x48` for [h, w]."""
    if isinstance(value, (list, tuple)):
        h, w = value
        return str(h) if h == w else f"{h}x{w}"
    return "" if value is None else str(value)


def summarise_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rows (variant, resolution, patch_size, mean, se, n) over the jobs' resolutions.json:
    one per variant, resolution and patch size, mean and standard error over the runs (the
    seeds). Empty when no job has one."""
    # resolutions.json, and e.g. resolutions_interpolate.json for RoPE's other policy
    paths = sorted(sweep_dir.glob(f"*/{RESULTS.removesuffix('.json')}*.json"))
    records = [json.loads(p.read_text()) for p in paths]
    models = {r.get("model") for r in records}
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    order: dict[tuple[str, str, str], tuple] = {}
    for record in records:
        name = variant_label(record)
        if len(models) > 1 and record.get("variant"):
            name += f" ({record.get('model')})"
        for result in record.get("results", []):
            if result.get("accuracy") is None:
                continue
            key = (name, show_size(result["resolution"]), show_size(result["patch_size"]))
            groups[key].append(float(result["accuracy"]))
            h, w = to_2tuple(result["resolution"], "resolution")
            order[key] = (name, key[2], h * w, h)
    rows = []
    for key in sorted(groups, key=order.__getitem__):
        values = groups[key]
        mean = sum(values) / len(values)
        se = None
        if len(values) > 1:
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
            se = math.sqrt(var / len(values))
        rows.append(
            {
                "variant": key[0],
                "resolution": key[1],
                "patch_size": key[2],
                "mean": mean,
                "se": se,
                "n": len(values),
                "x": order[key][3],
            }
        )
    return rows


def mean_above_training(record: dict[str, Any]) -> float | None:
    """Mean accuracy of a resolutions.json over the test resolutions above the training one
    (at the training patch size); None when it has none."""
    train = to_2tuple(record["train_resolution"], "train_resolution")
    accs = [
        r["accuracy"]
        for r in record.get("results", [])
        if r.get("accuracy") is not None
        and r.get("patch_size") == record.get("train_patch_size")
        and min(to_2tuple(r["resolution"], "resolution")) > max(train)
    ]
    return sum(accs) / len(accs) if accs else None


def rope_mixed_pairs(study: Path) -> dict[int, tuple[float, float]]:
    """seed -> (RoPE-Mixed, 1-D table) mean accuracy above the training resolution, from a
    resolution study's `kind=...,seed=N/resolutions.json` (claim 7 of analysis.claims)."""
    pairs = {}
    for rope_file in sorted(study.glob(f"kind=rope_mixed,seed=*/{RESULTS}")):
        seed = rope_file.parent.name.rsplit("=", 1)[1]
        ape_file = study / f"kind=learned_1d,seed={seed}" / RESULTS
        if not ape_file.is_file():
            continue
        rope, ape = (mean_above_training(json.loads(f.read_text())) for f in (rope_file, ape_file))
        if rope is not None and ape is not None:
            pairs[int(seed)] = (rope, ape)
    return pairs


COLUMNS = ("variant", "resolution", "patch_size", "mean", "se", "n")


def csv_text(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        se = "" if row["se"] is None else f"{row['se']:.6f}"
        writer.writerow({**row, "mean": f"{row['mean']:.6f}", "se": se})
    return text.getvalue()


def figure(rows: list[dict[str, Any]]) -> Figure:
    """Accuracy against the test resolution, one line per variant (and patch size), mean
    with the standard error over seeds as error bars."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), layout="tight")
    ax = fig.subplots()
    patches = {row["patch_size"] for row in rows}
    lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        name = row["variant"] + (f", patch {row['patch_size']}" if len(patches) > 1 else "")
        lines[name].append(row)
    for i, (name, points) in enumerate(lines.items()):
        xs = [p["x"] for p in points]
        means = [p["mean"] for p in points]
        errors = [p["se"] or 0.0 for p in points]
        ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, color=f"C{i % 10}", label=name)
    ticks = sorted({(p["x"], p["resolution"]) for p in rows})
    ax.set_xticks([x for x, _ in ticks], [t for _, t in ticks])
    ax.set_xlabel("test resolution (px)")
    ax.set_ylabel("test accuracy (top-1)")
    ax.set_title("Accuracy across test resolutions (mean ± s.e. over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the lines
    return fig


def write_sweep(sweep_dir: Path) -> list[Path]:
    """resolution.csv and resolution.png of a sweep whose jobs have resolutions.json;
    nothing (and no file) for one without."""
    rows = summarise_sweep(sweep_dir)
    if not rows:
        return []
    write_atomic(sweep_dir / "resolution.csv", csv_text(rows))
    figure(rows).savefig(sweep_dir / "resolution.png", dpi=120)
    return [sweep_dir / "resolution.csv", sweep_dir / "resolution.png"]


def read_csv(path: Path) -> list[dict[str, str]]:
    """resolution.csv's rows (report.html's table)."""
    return list(csv.DictReader(path.open())) if path.is_file() else []
