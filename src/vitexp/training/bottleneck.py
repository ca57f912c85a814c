"""Which is the bottleneck of a run, its data loader or its training step? (`check`: `make
gpu-check`, or alone `python -m vitexp.loader_check [overrides]`; the loader formats side by
side, `format_rates`: `make bench`)

A GPU that waits for its loader trains at the loader's speed, whatever the step's img/s.
For the run that a list of `vitexp.train` overrides describes (a preset, its data), this
measures separately

  the loader: the real train DataLoader (the run's source, workers and augmentation)
      delivering batches as the step receives them, in img/s: data.decode=cpu, and
      data.decode=gpu where asked (by default when a GPU is present), its device stage
      (batched JPEG decode, crop, normalise) included, as the training process runs it;
  the step: `vitexp.train`'s training step alone (its model, precision, compile, MixUp),
      on synthetic batches of the same shape (`step_timer.step_times`, the median step);

and says which one is slower and how many loader workers would keep up with the step at
the measured rate per worker. Without overrides it makes its own data: 500 x 375 JPEGs
(an ImageNet photo's size) in an image folder, for ViT-B/16 at 224 px on a GPU, the debug
model at 32 px on the CPU.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MEASURE = [  # what the step's timing run needs, after the run's own overrides
    "trainer.limit_val_batches=0",
    "trainer.progress_bar=false",
    "logger=csv",
    "figures=false",
    "fewshot.enabled=false",
]


def write_jpegs(root: Path, n: int, classes: int = 4, size: tuple[int, int] = (375, 500)):
    """root/train/class<k>/<i>.jpg: `n` smooth random photos-like JPEGs (quality 90)."""
    import torch.nn.functional as F
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        base = torch.rand(3, 24, 32, generator=g)  # smooth content compresses like photos
        pixels = F.interpolate(base[None], size=size, mode="bicubic")[0]
        array = (pixels.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{i}.jpg", quality=90)


def default_overrides(root: Path, gpu: bool) -> list[str]:
    """The run measured when none is given: an image folder of JPEGs under `root`."""
    model = (
        ["model=vit_b16", "data.batch_size=128"]
        if gpu
        else ["trainer=cpu", "model=vit_tiny_debug", "model.img_size=32", "data.batch_size=64"]
    )
    return [
        "data=imagefolder",
        f"data.root={root}",
        "data.val_fraction=0.0",
        "data.test_fraction=0.0",
        f"data.num_workers={min(8 if gpu else 4, os.cpu_count() or 1)}",
        *model,
    ]


def compose(overrides: list[str], max_steps: int) -> Any:
    """The validated config of `vitexp.train overrides`, set up to time `max_steps` steps."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from vitexp.config import CONFIG_DIR, register_configs, validate

    register_configs()
    extra = [*MEASURE, f"trainer.max_steps={max_steps}"]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return validate(hydra_compose("train", overrides=[*overrides, *extra]))


def loader_rate(c: Any, decode: str, device: torch.device, batches: int) -> dict[str, Any]:
    """Images/s of the run's train loader with data.decode=`decode` (its workers: the
    first batch of each is not timed, the workers start then), and with decode=gpu that of
    its device stage, timed alone on the same batches: in training it runs between steps,
    in the training process, so it adds to the step's time."""
    from dataclasses import replace

    from lightning.fabric.utilities.apply_func import move_data_to_device

    from vitexp.data import ImageDataModule

    cfg = replace(c.data, decode=decode)
    dm = ImageDataModule(cfg, c.model.img_size, c.model.mean, c.model.std, c.seed)
    dm.setup("fit")
    loader = dm.train_dataloader()
    skip, kept, start = max(1, cfg.num_workers), [], 0.0
    while len(kept) < batches:  # epochs again if the split is short
        before = len(kept)
        for i, batch in enumerate(loader):
            if i == skip - 1:
                start = time.perf_counter()
            elif i >= skip:
                kept.append(batch)  # decode=cpu: only counted (its pixels are let go)
                if decode == "cpu":
                    kept[-1] = len(batch[0])
                if len(kept) == batches:
                    break
        if len(kept) == before:
            raise RuntimeError(f"the train loader gives fewer than {skip + 1} batches")
    elapsed = time.perf_counter() - start
    seen = sum(b if isinstance(b, int) else len(b) for b in kept)
    out = {
        "images_per_s": seen / elapsed,
        "per_worker": seen / elapsed / max(1, cfg.num_workers),
        "workers": cfg.num_workers,
        "device_stage_images_per_s": None,
        "num_classes": dm.num_classes,
    }
    if decode == "gpu":
        start = time.perf_counter()
        for batch in kept:
            dm.on_after_batch_transfer(move_data_to_device(batch, device), 0)
        _synchronize(device)
        out["device_stage_images_per_s"] = seen / (time.perf_counter() - start)
    return out


# --- the loader formats, side by side (`make bench`) ---------------------------------------
FORMATS = ("imagefolder", "parquet", "litdata")
TRAINING_SPEEDS = (1_000, 3_000, 10_000)  # img/s of a training step, for "workers needed"


def write_formats(root: Path, n: int, shards: int = 4) -> dict[str, list[str]]:
    """The same `n` JPEGs as an image folder, as parquet shards (`datasets`' layout: an Image
    column of the encoded bytes, a ClassLabel, row groups of 100 images) and as a litdata
    pack (`vitexp.data.pack`); returns each format's `vitexp.train` data overrides."""
    import contextlib
    import io

    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage
    from datasets.utils.logging import disable_progress_bar

    from vitexp.data.pack import PackCommandConfig, pack

    disable_progress_bar()  # datasets' bar for each shard written: not the bench's output
    folder, parquet, packed = root / "folder", root / "parquet", root / "pack"
    write_jpegs(folder, n)
    files = sorted((folder / "train").glob("*/*.jpg"))
    names = sorted({f.parent.name for f in files})
    parquet.mkdir()
    features = Features({"image": HFImage(), "label": ClassLabel(names=names)})
    for k in range(shards):
        part = files[k::shards]
        rows = {
            "image": [{"bytes": f.read_bytes(), "path": None} for f in part],
            "label": [names.index(f.parent.name) for f in part],
        }
        written = Dataset.from_dict(rows, features=features)
        written.to_parquet(str(parquet / f"train-{k}.parquet"), batch_size=100)
    with contextlib.redirect_stdout(io.StringIO()):  # its closing line is for a person
        pack(PackCommandConfig(src=str(folder), out=str(packed), progress=False))
    return {
        "imagefolder": [
            "data=imagefolder",
            f"data.root={folder}",
            "data.val_fraction=0.0",
            "data.test_fraction=0.0",
        ],
        "parquet": [
            "data=hf",
            "data.dataset=parquet",
            f"data.data_files.train={parquet}/train-*.parquet",
            "data.streaming=true",
            f"data.num_classes={len(names)}",
            "data.test_split=null",
            f"data.val_size={max(1, n // 10)}",  # val, then test: the head of the shards
            "data.shuffle_buffer=1000",
        ],
        "litdata": ["data=litdata", f"data.root={packed}"],
    }


def format_rates(
    num_images: int, img_size: int, batch: int, workers: int = 1, batches: int = 6
) -> dict[str, Any]:
    """Images/s per loader worker of each format with the paper's training augmentation
    (Inception crop, flip) at `img_size`: data.decode=cpu (the worker decodes and augments)
    and data.decode=gpu (the worker reads bytes and draws; its device stage timed apart,
    here on the CPU), and the workers a GPU needs at TRAINING_SPEEDS."""
    common = [
        "trainer=cpu",
        "model=vit_tiny_debug",
        f"model.img_size={img_size}",
        f"data.batch_size={batch}",
        f"data.num_workers={workers}",
        "data.augment.random_resized_crop=true",
        "data.augment.hflip=true",
    ]
    rates: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vitexp-formats-") as tmp:
        formats = write_formats(Path(tmp), num_images)
        for name in FORMATS:
            c = compose([*common, *formats[name]], 1)
            for decode in ("cpu", "gpu"):
                r = loader_rate(c, decode, torch.device("cpu"), batches)
                per_worker = r["per_worker"]
                rates[f"{name}/{decode}"] = {
                    "format": name,
                    "decode": decode,
                    "per_worker_images_per_s": round(per_worker, 1),
                    "device_stage_images_per_s": r["device_stage_images_per_s"]
                    and round(r["device_stage_images_per_s"], 1),
                    "workers_needed": {
                        str(speed): math.ceil(speed / per_worker) for speed in TRAINING_SPEEDS
                    },
                }
    return {"img_size": img_size, "batch": batch, "workers": workers, "rates": rates}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(
    overrides: list[str] | None = None,
    gpu: bool | None = None,
    decodes: tuple[str, ...] | None = None,
    batches: int = 6,
    steps: int = 8,
) -> dict[str, Any]:
    """Loader and step img/s for the run of `overrides`, and the verdict (see the module
    doc). `decodes`: the data.decode values to time (default: cpu, and gpu on a GPU)."""
    from vitexp.training.step_timer import step_times

    gpu = torch.cuda.is_available() if gpu is None else gpu
    device = torch.device("cuda" if gpu else "cpu")
    decodes = decodes or (("cpu", "gpu") if gpu else ("cpu",))
    with tempfile.TemporaryDirectory(prefix="vitexp-loader-check-") as tmp:
        if not overrides:
            workers = min(8 if gpu else 4, os.cpu_count() or 1)
            batch = 128 if gpu else 64
            write_jpegs(Path(tmp), min(2048, batch * (max(1, workers) + batches)))
            overrides = default_overrides(Path(tmp), gpu)
        warmup = 2
        c = compose(list(overrides), warmup + steps)
        loaders = {d: loader_rate(c, d, device, batches) for d in decodes}
        num_classes = next(iter(loaders.values()))["num_classes"]
        # the median step: a shared machine's stalls and Lightning's periodic work aside
        step = c.data.batch_size / statistics.median(step_times(c, num_classes, warmup, steps))
    return verdict(step, loaders, c.data.decode, c.data.batch_size)


def verdict(step: float, loaders: dict[str, dict], configured: str, batch: int) -> dict:
    """The facts and the one line. Per decode: the step's rate as the GPU sees it (with
    decode=gpu the device stage adds its time to each step), the loader's against it, and
    the workers that would keep up; the verdict is that of the run's own data.decode."""
    facts: dict[str, dict[str, Any]] = {}
    for decode, r in loaders.items():
        stage = r["device_stage_images_per_s"]
        busy = step if stage is None else 1 / (1 / step + 1 / stage)  # step + device stage
        facts[decode] = {
            "bottleneck": "loader" if r["images_per_s"] < busy else "step",
            "loader_images_per_s": round(r["images_per_s"], 1),
            "per_worker_images_per_s": round(r["per_worker"], 1),
            "workers": r["workers"],
            "workers_needed": math.ceil(busy / r["per_worker"]),
            "step_images_per_s": round(busy, 1),
            "device_stage_images_per_s": stage and round(stage, 1),
        }
    decode = configured if configured in facts else next(iter(facts))
    mine = facts[decode]
    parts = []
    for d, f in facts.items():
        n = f["workers_needed"]
        loader = (
            f"data.decode={d}: {f['loader_images_per_s']:.0f} img/s from {f['workers']} "
            f"workers ({f['per_worker_images_per_s']:.0f} each"
        )
        if f["device_stage_images_per_s"] is not None:
            loader += (
                f"), device stage {f['device_stage_images_per_s']:.0f} img/s (step + stage "
                f"{f['step_images_per_s']:.0f}"
            )
        parts.append(f"{loader}: {n} worker{'s' * (n != 1)} would keep up)")
    line = (
        f"bottleneck: {mine['bottleneck']} with data.decode={decode}; the step "
        f"{step:.0f} img/s (batch {batch}); loader " + "; ".join(parts)
    )
    return {
        "bottleneck": mine["bottleneck"],
        "decode": decode,
        "step_images_per_s": round(step, 1),
        "loader_images_per_s": mine["loader_images_per_s"],
        "workers": mine["workers"],
        "workers_needed": mine["workers_needed"],
        "decodes": facts,
        "line": line,
    }
