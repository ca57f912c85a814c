"""`python -m vitexp.predict pretrained=CKPT images=DIR_OR_FILES [topk=5] [out=FILE.csv]`:
classify images with a trained checkpoint.

The checkpoint says everything needed: the model and its weights (the average, where the
run kept one), the evaluation preprocessing of its run (resize to img_size / crop_pct,
center crop, the model's mean and std), the class names of its head, and the loss it was
trained with, which decides the probabilities: a softmax over the classes, or one sigmoid
per class for the paper's sigmoid pretraining loss. Writes a CSV (file, then the top-k
labels and probabilities) and prints the first rows.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitexp.data.config import ON_CORRUPT, AugmentConfig
from vitexp.data.images import IMAGE_SUFFIXES
from vitexp.errors import ConfigError, DataError

log = logging.getLogger("vitexp")


@dataclass
class PredictCommandConfig:
    pretrained: str | None = None  # a checkpoint, a run directory or a directory of runs
    images: Any = None  # a folder (searched recursively), an image file, or a list of them
    topk: int = 5
    out: str = "predictions.csv"
    batch_size: int = 64
    on_corrupt: str = "skip"  # skip: warn and go on | error: stop at the first
    device: str | None = None  # default: cuda when there is one, else cpu


def image_files(images: Any) -> list[Path]:
    """The image files `images=` names, in a stable order (folders sorted, recursive)."""
    items = images if isinstance(images, (list, tuple)) else [images]
    files: list[Path] = []
    for item in items:
        path = Path(str(item))
        if path.is_dir():
            found = sorted(
                f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise DataError(f"images={path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"images={path} does not exist; give image files or folders")
    return files


def probabilities(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """What the training loss makes of the logits: softmax, or independent sigmoids."""
    return torch.sigmoid(logits) if loss == "sigmoid" else logits.softmax(-1)


def predict(c: PredictCommandConfig) -> list[dict[str, Any]]:
    """Top-k predictions of every readable image; writes `c.out` and returns its rows."""
    from rich.progress import track

    from vitexp.data.files import write_atomic
    from vitexp.data.images import ImageDecoder
    from vitexp.data.transforms import build_transforms
    from vitexp.training.checkpoint import model_from, read_checkpoint, resolve_pretrained

    if not c.pretrained:
        raise ConfigError("pretrained is not set; give a checkpoint: pretrained=PATH/last.ckpt")
    if c.images is None:
        raise ConfigError("images is not set; give a folder or files: images=DIR")
    if c.topk < 1 or c.batch_size < 1:
        raise ConfigError(f"topk={c.topk} and batch_size={c.batch_size} must be >= 1")
    if c.on_corrupt not in ON_CORRUPT:
        raise ConfigError(f"on_corrupt={c.on_corrupt!r}: choose one of {', '.join(ON_CORRUPT)}")
    files = image_files(c.images)
    checkpoint = resolve_pretrained(c.pretrained)
    content = read_checkpoint(checkpoint, "pretrained")
    model, meta = model_from(content, checkpoint, "pretrained")
    if model.cfg.in_chans != 3:
        raise ConfigError(
            f"pretrained={checkpoint} takes {model.cfg.in_chans} channels; predict reads RGB images"
        )
    loss = content.get("hyper_parameters", {}).get("loss", {}).get("name", "softmax")
    names = meta.get("class_names") or [str(i) for i in range(model.num_classes)]
    crop = AugmentConfig(crop_pct=meta.get("eval_crop_pct", AugmentConfig.crop_pct))
    transform = build_transforms(crop, model.img_size, model.cfg.mean, model.cfg.std, False)
    device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    decode = ImageDecoder(c.on_corrupt, key="")
    topk = min(c.topk, len(names))

    rows: list[dict[str, Any]] = []
    batches = [files[i : i + c.batch_size] for i in range(0, len(files), c.batch_size)]
    for batch in track(batches, description="predict", transient=True):
        kept, tensors = [], []
        for path in batch:
            img = decode(path, str(path))
            if img is not None:
                kept.append(path)
                tensors.append(transform(img))
        if not tensors:
            continue
        with torch.inference_mode():
            probs = probabilities(model(torch.stack(tensors).to(device)).float(), loss)
        values, indices = probs.topk(topk, dim=-1)
        for path, p, i in zip(kept, values.tolist(), indices.tolist(), strict=True):
            row: dict[str, Any] = {"file": str(path)}
            for rank, (prob, index) in enumerate(zip(p, i, strict=True), start=1):
                row[f"label_{rank}"], row[f"prob_{rank}"] = names[index], round(prob, 6)
            rows.append(row)

    text = io.StringIO()
    header = ["file", *(f"{k}_{r}" for r in range(1, topk + 1) for k in ("label", "prob"))]
    writer = csv.DictWriter(text, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(Path(c.out), text.getvalue())
    print_table(rows, loss, len(files) - len(rows))
    print(f"-> {c.out} ({len(rows)} images)")
    return rows


def print_table(rows: list[dict[str, Any]], loss: str, skipped: int, shown: int = 10) -> None:
    """The first rows: file, top-1 label and its probability."""
    from rich.console import Console
    from rich.table import Table

    kind = "sigmoid" if loss == "sigmoid" else "softmax"
    table = Table(title=f"top-1 of {len(rows)} images ({kind} probabilities)")
    for column in ("file", "label", "probability"):
        table.add_column(column)
    for row in rows[:shown]:
        table.add_row(Path(row["file"]).name, str(row["label_1"]), f"{row['prob_1']:.4f}")
    Console().print(table)
    if skipped:
        log.warning("%d unreadable image(s) skipped (on_corrupt=skip)", skipped)


def main() -> None:
    from vitexp.training.cli import hydra_command

    hydra_command("predict", PredictCommandConfig, predict)


if __name__ == "__main__":
    main()
