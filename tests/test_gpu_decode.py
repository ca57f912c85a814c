"""data.decode=gpu on the CPU (device=cpu, the same functions a GPU runs): the workers send
JPEG bytes and the random draws, the device stage makes the pixels. Against decode=cpu: the
same crop boxes, flips and RandAugment ops exactly, the same pixels within what PIL's and
torch's resampling differ by (measured: at most 1 uint8 level at full decode, 3 levels where
PIL decodes a large JPEG at a reduced DCT scale and the device decodes it whole)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torchvision.transforms import v2

from data_helpers import data_cfg, png_bytes
from test_config import error_line
from vitexp.data import ImageDataModule, gpu_decode
from vitexp.data.config import AugmentConfig, RandAugmentConfig
from vitexp.data.gpu_decode import Encoded, PendingBatch
from vitexp.errors import DataError
from vitexp.training import bottleneck

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.25, 0.25]
LEVEL = 1 / 255 / 0.25  # one uint8 level after normalisation
SQUARE_AND_NOT = [(48, 64), (64, 48), (40, 40)]


def photo(size: tuple[int, int], seed: int, tint: int | None = None) -> np.ndarray:
    """Smooth random content with some noise: compresses and resamples like a photo;
    `tint`: that colour channel brighter (a class a model can learn)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 12, 16, generator=g)
    if tint is not None:
        base[tint] = base[tint] * 0.5 + 0.5
    pixels = F.interpolate(base[None], size=size, mode="bicubic")[0].clamp(0, 1) * 255
    noise = torch.randint(-12, 13, pixels.shape, generator=g)
    return (pixels + noise).clamp(0, 255).byte().permute(1, 2, 0).numpy()


def write_jpegs(root: Path, sizes, per_class=6, classes=2, tint=False) -> list[Path]:
    paths = []
    for i in range(per_class * classes):
        path = root / "train" / f"c{i % classes}" / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = photo(sizes[i % len(sizes)], i, i % classes if tint else None)
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def module(root: Path, decode: str, augment: AugmentConfig, img_size=(32, 32), **kw):
    cfg = dict(source="imagefolder", root=str(root), batch_size=4, augment=augment)
    cfg.update(val_fraction=0.5, test_fraction=0.0, decode=decode)
    cfg.update(kw)
    dm = ImageDataModule(data_cfg(**cfg), img_size, MEAN, STD, seed=3)
    dm.setup("fit")
    return dm


def on_device(dm: ImageDataModule, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """All batches of a loader as the step receives them (transfer, then the hook)."""
    out = [dm.on_after_batch_transfer(move_data_to_device(b, "cpu"), 0) for b in loader]
    return torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])


def pending(dm: ImageDataModule, loader) -> list:
    return [item for batch in loader for item in batch.items]


def close(a: torch.Tensor, b: torch.Tensor, levels: float = 2, mean: float = 0.2) -> float:
    """The largest difference in uint8 levels, checked against `levels`, and the mean one
    against `mean`. PIL and torch resample uint8 in two fixed-point passes, each rounded:
    they differ by a level on a few pixels, by two on one in ten thousand."""
    diff = (a - b).abs() / LEVEL
    worst, average = float(diff.max()), float(diff.mean())
    assert worst <= levels + 1e-3 and average <= mean, (worst, average)
    return worst


class Spy:
    """Records what the decode=cpu pipeline draws: crop boxes, flips, RandAugment ops."""

    def __init__(self, monkeypatch) -> None:
        self.events: list = []
        crop, flip = v2.RandomResizedCrop.make_params, v2.RandomHorizontalFlip.transform
        ra = v2.RandAugment._apply_image_or_video_transform

        def crop_params(op, inputs):
            params = crop(op, inputs)
            self.events.append(
                ("box", tuple(params[k] for k in ("top", "left", "height", "width")))
            )
            return params

        def flipped(op, inpt, params):
            self.events.append(("flip", True))
            return flip(op, inpt, params)

        def randaugment(op, img, name, magnitude, **kw):
            self.events.append(("op", (name, round(magnitude, 6))))
            return ra(op, img, name, magnitude, **kw)

        monkeypatch.setattr(v2.RandomResizedCrop, "make_params", crop_params)
        monkeypatch.setattr(v2.RandomHorizontalFlip, "transform", flipped)
        monkeypatch.setattr(v2.RandAugment, "_apply_image_or_video_transform", randaugment)

    def take(self) -> list:
        events, self.events = self.events, []
        return events

    def per_sample(self) -> list[tuple]:
        """(box, flip) per sample, from the decode=cpu pipeline's events."""
        samples = []
        for kind, value in self.take():
            if kind == "box":
                samples.append([value, False])
            elif kind == "flip":
                samples[-1][1] = True
        return [tuple(s) for s in samples]


# --- the same pixels as decode=cpu ----------------------------------------------------------
@pytest.mark.parametrize("crop_pct", [0.5, 0.875, 1.0])
@pytest.mark.parametrize(
    ("img_size", "sizes"), [((32, 32), SQUARE_AND_NOT), ((24, 40), [(60, 90)])]
)
def test_eval_batches_match_decode_cpu(tmp_path, crop_pct, img_size, sizes):
    write_jpegs(tmp_path, sizes)
    augment = AugmentConfig(crop_pct=crop_pct)
    cpu = module(tmp_path, "cpu", augment, img_size)
    gpu = module(tmp_path, "gpu", augment, img_size)
    assert all(item.encoded for item in pending(gpu, gpu.val_dataloader()))  # decoded on device
    x_cpu, y_cpu = on_device(cpu, cpu.val_dataloader())
    x_gpu, y_gpu = on_device(gpu, gpu.val_dataloader())
    assert x_gpu.shape == (6, 3, *img_size) and x_gpu.dtype == torch.float32
    assert torch.equal(y_gpu, y_cpu)
    close(x_gpu, x_cpu)  # libjpeg decodes identically; PIL vs torch resampling differ


@pytest.mark.parametrize("workers", [0, 2])
def test_train_batches_draw_the_same_boxes_and_flips(tmp_path, monkeypatch, workers):
    write_jpegs(tmp_path, SQUARE_AND_NOT)
    spy = Spy(monkeypatch)
    cpu = module(tmp_path, "cpu", AugmentConfig(), num_workers=0)
    x_cpu, y_cpu = on_device(cpu, cpu.train_dataloader())
    drawn = spy.per_sample()
    gpu = module(tmp_path, "gpu", AugmentConfig(), num_workers=workers)
    items = pending(gpu, gpu.train_dataloader())
    assert [(item.box, item.flip) for item in items] == drawn  # exactly: the same seeds
    assert len({box for box, _ in drawn}) == len(drawn) and 0 < sum(f for _, f in drawn) < 6
    x_gpu, y_gpu = on_device(gpu, gpu.train_dataloader())
    assert torch.equal(y_gpu, y_cpu)
    close(x_gpu, x_cpu)


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_training_without_the_random_crop_frames_as_evaluation(tmp_path, crop_pct):
    """Without the random crop both decodes frame a training image as evaluation does
    (resize by crop_pct, center crop), then flip."""
    write_jpegs(tmp_path, SQUARE_AND_NOT)
    augment = AugmentConfig(random_resized_crop=False, crop_pct=crop_pct)
    cpu = module(tmp_path, "cpu", augment, num_workers=0)
    gpu = module(tmp_path, "gpu", augment, num_workers=0)
    items = pending(gpu, gpu.train_dataloader())
    assert all(item.box is None for item in items) and 0 < sum(i.flip for i in items) < 6
    x_cpu, y_cpu = on_device(cpu, cpu.train_dataloader())
    x_gpu, y_gpu = on_device(gpu, gpu.train_dataloader())
    assert torch.equal(y_gpu, y_cpu)
    close(x_gpu, x_cpu)


def test_large_jpegs_crop_on_the_dct_scaled_size_and_decode_whole(tmp_path, monkeypatch):
    """decode=cpu decodes a large JPEG at 1/2..1/8 scale (Image.draft); decode=gpu draws
    the crop on that same size and cuts it from the full decode."""
    write_jpegs(tmp_path, [(500, 700), (700, 500)], per_class=2)
    spy = Spy(monkeypatch)
    cpu = module(tmp_path, "cpu", AugmentConfig(), val_fraction=0.0)
    x_cpu, _ = on_device(cpu, cpu.train_dataloader())
    drawn = spy.per_sample()
    gpu = module(tmp_path, "gpu", AugmentConfig(), val_fraction=0.0)
    items = pending(gpu, gpu.train_dataloader())
    scale = 4  # shorter side 500 // ceil(32 / sqrt(0.08)) = 4: decoded at 1/4
    assert [(tuple(v * scale for v in box), flip) for box, flip in drawn] == [
        (item.box, item.flip) for item in items
    ]
    x_gpu, _ = on_device(gpu, gpu.train_dataloader())
    assert close(x_gpu, x_cpu, levels=3, mean=0.5) > 0  # not PIL's DCT scaling: the full decode
    x_cpu, _ = on_device(cpu, cpu._eval_loader("train"))
    x_gpu, _ = on_device(gpu, gpu._eval_loader("train"))
    close(x_gpu, x_cpu, levels=3, mean=0.5)


def test_randaugment_draws_the_same_ops_on_the_device(tmp_path, monkeypatch):
    write_jpegs(tmp_path, SQUARE_AND_NOT)
    augment = AugmentConfig(randaugment=RandAugmentConfig(num_ops=2, magnitude=15))
    spy = Spy(monkeypatch)
    cpu = module(tmp_path, "cpu", augment, val_fraction=0.0)
    x_cpu, _ = on_device(cpu, cpu.train_dataloader())
    ops_cpu = [v for kind, v in spy.take() if kind == "op"]
    gpu = module(tmp_path, "gpu", augment, val_fraction=0.0)
    batches = list(gpu.train_dataloader())
    spy.take()
    rng = torch.get_rng_state()
    out = [gpu.on_after_batch_transfer(b, 0) for b in batches]
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG (MixUp, dropout) untouched
    ops_gpu = [v for kind, v in spy.take() if kind == "op"]
    assert len(ops_cpu) == 2 * 12 and ops_gpu == ops_cpu  # the same ops and magnitudes
    x_gpu = torch.cat([x for x, _ in out])
    # the ops act on pixels that differ by a level: a solarize threshold or an equalised
    # histogram can turn that into more, on a few pixels
    assert float((x_gpu - x_cpu).abs().mean()) / LEVEL < 1.0


def test_mixed_batches_of_png_cmyk_grey_and_jpeg(tmp_path):
    """What nvjpeg cannot take is decoded by PIL in the worker and sent as pixels."""
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(photo((40, 56), 0)).save(folder / "0.png")
    Image.fromarray(photo((40, 56), 1)).convert("CMYK").save(folder / "1.jpg", quality=90)
    Image.fromarray(photo((40, 56), 2)).convert("L").save(folder / "2.jpg", quality=90)
    Image.fromarray(photo((56, 40), 3)).save(folder / "3.jpg", quality=90)
    write_jpegs(tmp_path, [(40, 56)], per_class=2, classes=1)  # 2 more in train/c0
    kw = dict(val_fraction=0.0, batch_size=6)
    cpu, gpu = (module(tmp_path, d, AugmentConfig(), **kw) for d in ("cpu", "gpu"))
    (batch,) = gpu._eval_loader("train")  # in file order: 0.png, 1.jpg (CMYK), 2.jpg (grey)...
    assert [item.encoded for item in batch.items] == [False, False, True, True, True, True]
    for train in (True, False):  # a random crop, the eval resize
        loaders = [
            dm.train_dataloader() if train else dm._eval_loader("train") for dm in (cpu, gpu)
        ]
        x_cpu, _ = on_device(cpu, loaders[0])
        x_gpu, _ = on_device(gpu, loaders[1])
        close(x_gpu, x_cpu)


def test_in_memory_pixels_are_cropped_on_the_device():
    """digits (8 x 8 arrays) with decode=gpu: uint8 pixels, upsampled on the device."""
    augment = AugmentConfig(crop_pct=1.0)
    out = {}
    for decode in ("cpu", "gpu"):
        cfg = data_cfg(source="digits", decode=decode, batch_size=64, augment=augment)
        dm = ImageDataModule(cfg, (32, 32), MEAN, STD, seed=1)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        out[decode] = dm.on_after_batch_transfer(batch, 0)
    assert isinstance(batch, PendingBatch) and not batch.items[0].encoded
    assert torch.equal(out["gpu"][1], out["cpu"][1])
    close(out["gpu"][0], out["cpu"][0])


def write_hf(root: Path, images: list[bytes]) -> None:
    """train.parquet and test.parquet, the same rows: an Image column, labels 0, 1, 0, ..."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    rows = {
        "image": [{"bytes": b, "path": f"row{i}.jpg"} for i, b in enumerate(images)],
        "label": [i % 2 for i in range(len(images))],
    }
    features = Features({"image": HFImage(), "label": ClassLabel(names=["a", "b"])})
    for split in ("train", "test"):
        Dataset.from_dict(rows, features=features).to_parquet(str(root / f"{split}.parquet"))


def test_hf_parquet_rows_are_sent_encoded(tmp_path, hf_offline):
    images = [png_bytes(Image.fromarray(photo((36, 48), i)), "JPEG") for i in range(6)]
    images[4] = png_bytes(Image.fromarray(photo((36, 48), 4)))  # a PNG among them
    write_hf(tmp_path, images)
    files = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "test")}
    out = {}
    for decode in ("cpu", "gpu"):
        cfg = data_cfg(source="hf", data_files=files, decode=decode, batch_size=6)
        dm = ImageDataModule(cfg, (24, 24), MEAN, STD, seed=0)
        dm.setup("fit")
        batch = next(iter(dm.test_dataloader()))
        out[decode] = dm.on_after_batch_transfer(batch, 0)
    assert [item.encoded for item in batch.items] == [True] * 4 + [False, True]
    assert torch.equal(out["gpu"][1], out["cpu"][1])
    close(out["gpu"][0], out["cpu"][0])


def test_a_streamed_parquet_split_is_sent_encoded(tmp_path, hf_offline):
    """The stream's rows reach the same decoder seam: crops drawn from the stream's
    per-row seeds, decoded on the device."""
    write_hf(tmp_path, [png_bytes(Image.fromarray(photo((36, 48), i)), "JPEG") for i in range(24)])
    files = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "test")}
    out = {}
    for decode in ("cpu", "gpu"):
        cfg = data_cfg(source="hf", data_files=files, decode=decode, streaming=True)
        cfg.val_size, cfg.num_classes, cfg.augment = 4, 2, AugmentConfig()
        dm = ImageDataModule(cfg, (24, 24), MEAN, STD, seed=0)
        dm.setup("fit")
        if decode == "gpu":
            assert all(item.encoded for item in pending(dm, dm.train_dataloader()))
        out[decode] = [
            on_device(dm, loader()) for loader in (dm.train_dataloader, dm.test_dataloader)
        ]
    for n, (x_gpu, y_gpu), (x_cpu, y_cpu) in zip((20, 24), out["gpu"], out["cpu"], strict=True):
        assert torch.equal(y_gpu, y_cpu) and len(y_gpu) == n  # train: 4 rows held out for val
        close(x_gpu, x_cpu)


# --- corrupt files, structure, config -------------------------------------------------------
def broken_jpeg() -> bytes:
    """A JPEG whose header reads well and which ends in EOI, but whose scan holds a second
    SOF marker: the worker sends it, the device's decode fails, and so does PIL's."""
    good = png_bytes(Image.fromarray(photo((32, 32), 9)), "JPEG")
    sos = good.find(b"\xff\xda")
    return good[: sos + 200] + b"\xff\xc0" + good[sos + 202 :]


def test_a_corrupt_jpeg_on_the_device_is_skipped_or_named(tmp_path):
    write_jpegs(tmp_path, [(32, 32)], per_class=3)
    bad = tmp_path / "train" / "c0" / "99_broken.jpg"
    bad.write_bytes(broken_jpeg())
    truncated = tmp_path / "train" / "c1" / "98_truncated.jpg"
    truncated.write_bytes(bad.read_bytes()[:300])  # no EOI: PIL in the worker reports it
    kw = dict(val_fraction=0.0, batch_size=8, on_corrupt="skip")
    dm = module(tmp_path, "gpu", AugmentConfig(crop_pct=1.0), **kw)
    loader = dm._eval_loader("train")
    with pytest.warns(UserWarning, match=r"skipping unreadable image \S+98_truncated\.jpg"):
        batches = list(loader)
    items = [item for b in batches for item in b.items]
    assert [item.name.endswith("99_broken.jpg") for item in items if item.encoded].count(True) == 1
    assert len(items) == 6 + 1  # the truncated file was dropped by its worker
    with pytest.warns(UserWarning, match=r"skipping unreadable image \S+99_broken\.jpg"):
        x, y = on_device(dm, batches)
    assert x.shape == (6, 3, 32, 32) and len(y) == 6  # dropped with its label
    truncated.unlink()  # with on_corrupt=error it stops the worker: test_data tests that
    dm = module(tmp_path, "gpu", AugmentConfig(crop_pct=1.0), **{**kw, "on_corrupt": "error"})
    (batch,) = dm._eval_loader("train")  # the worker sent it: its decode fails on the device
    with pytest.raises(DataError, match=r"^\S+99_broken\.jpg: unreadable image \([^\n]*skip$"):
        dm.on_after_batch_transfer(batch, 0)


def test_a_jpeg_the_device_refuses_is_decoded_by_pil(tmp_path, monkeypatch, caplog):
    """nvjpeg refuses some JPEGs PIL reads (e.g. some progressive or 12-bit files): the
    batch is retried image by image and the refused one decoded on the host."""
    paths = write_jpegs(tmp_path, SQUARE_AND_NOT)
    refused = paths[3].read_bytes()
    real = gpu_decode.decode_jpeg

    def nvjpeg(data, **kw):
        if any(len(d) == len(refused) for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("nvjpegDecode failed: NVJPEG_STATUS_BAD_JPEG")
        return real(data, **kw)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", nvjpeg)
    augment = AugmentConfig(crop_pct=0.875)
    cpu, gpu = (module(tmp_path, d, augment, val_fraction=0.0) for d in ("cpu", "gpu"))
    x_cpu, _ = on_device(cpu, cpu._eval_loader("train"))
    with caplog.at_level("WARNING", logger="vitexp"):
        x_gpu, _ = on_device(gpu, gpu._eval_loader("train"))
    close(x_gpu, x_cpu)
    assert gpu.device_stage.rescued == 1 and f"{paths[3]} could not be decoded" in caplog.text


def test_lightning_moves_a_pending_batch_and_fewshot_reads_pil(tmp_path):
    write_jpegs(tmp_path, SQUARE_AND_NOT)
    gpu = module(tmp_path, "gpu", AugmentConfig())
    batch = next(iter(gpu.train_dataloader()))
    moved = move_data_to_device(batch, torch.device("cpu"))  # what Lightning calls
    assert isinstance(moved, PendingBatch) and moved.device == torch.device("cpu")
    if torch.cuda.is_available():
        assert moved.pin_memory().labels.is_pinned()
    assert isinstance(gpu._split("train")[0][0], Encoded)
    cpu = module(tmp_path, "cpu", AugmentConfig())
    for split in ("train", "val"):  # few-shot and the pixel baselines: as with decode=cpu
        a, b = gpu.split_dataset(split)[0], cpu.split_dataset(split)[0]
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
        assert isinstance(gpu.raw_split(split)[0][0], Image.Image)


def test_decode_must_be_cpu_or_gpu():
    line = error_line(["data.decode=nvjpeg"])
    assert line == "data.decode='nvjpeg' is not allowed; choose one of cpu, gpu", line


# --- a real run -----------------------------------------------------------------------------
def train_losses(work: Path, decode: str) -> tuple[list[float], dict]:
    run_dir = work / decode
    cmd = [
        sys.executable, "-m", "vitexp.train", "data=imagefolder", f"data.root={work / 'data'}",
        f"data.decode={decode}", "data.num_workers=2", "data.batch_size=8",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.compile=false",
        "model=vit_tiny_debug", "model.img_size=32", "trainer.max_steps=6",
        "trainer.max_epochs=null", "trainer.val_check_interval=3",
        "trainer.check_val_every_n_epoch=null", "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false", "schedule.warmup_steps=1", "figures=false",
        "fewshot.enabled=false", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss"]]
    results = json.loads((run_dir / "results.json").read_text())
    return [float(r["train/loss"]) for r in rows], results


@pytest.mark.slow
def test_a_run_with_gpu_decode_follows_the_cpu_decode_run(tmp_path):
    """`vitexp.train data.decode=gpu` on the CPU, 2 workers: the same crops and flips, the
    pixels within a level, so the loss trajectory stays with decode=cpu's."""
    write_jpegs(tmp_path / "data", SQUARE_AND_NOT, per_class=16, tint=True)
    cpu, cpu_results = train_losses(tmp_path, "cpu")
    gpu, gpu_results = train_losses(tmp_path, "gpu")
    assert len(gpu) == len(cpu) == 6
    assert max(abs(a - b) for a, b in zip(gpu, cpu, strict=True)) < 2e-3, (gpu, cpu)
    assert cpu[-1] < cpu[0]  # it learns: a trajectory, not 6 equal numbers
    acc = [r["metrics"]["test/acc"] for r in (cpu_results, gpu_results)]
    assert abs(acc[0] - acc[1]) <= 1 / 8, acc


# --- loader or step: the bottleneck ---------------------------------------------------------
@pytest.fixture
def one_thread():
    """One torch thread, as conftest gives each xdist worker: with other jobs on the cores,
    two threads that wait for each other in every op make a tiny step 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def consistent(facts: dict) -> None:
    for decode, f in facts["decodes"].items():
        assert f["loader_images_per_s"] > 0 and f["step_images_per_s"] > 0, decode
        slower = "loader" if f["loader_images_per_s"] < f["step_images_per_s"] else "step"
        assert f["bottleneck"] == slower, f
        per = f["per_worker_images_per_s"]
        assert f["workers_needed"] == math.ceil(f["step_images_per_s"] / per) or (
            abs(f["workers_needed"] - f["step_images_per_s"] / per) < 1.01  # rounded facts
        )
    assert facts["step_images_per_s"] > 0
    assert facts["line"].startswith(f"bottleneck: {facts['bottleneck']} with data.decode=")


def test_a_heavy_loader_without_workers_is_the_bottleneck(tmp_path, one_thread):
    """Whole 500 x 375 decodes (crop_pct 0.05 leaves PIL no DCT scaling), RandAugment, no
    workers, against a one-layer model on 16 tokens: the loader is 4x slower than the step
    (measured with other jobs on the 2 cores; 10x alone)."""
    bottleneck.write_jpegs(tmp_path, 3 * 64)
    facts = bottleneck.check(
        [
            *bottleneck.default_overrides(tmp_path, gpu=False),
            "data.num_workers=0",
            "data.augment.crop_pct=0.05",
            "data.augment.randaugment.num_ops=4",
            "model.depth=1",
            "model.img_size=16",
        ],
        gpu=False,
        decodes=("cpu", "gpu"),  # decode=gpu's device stage, on the CPU
        batches=2,
        steps=5,
    )
    consistent(facts)
    assert facts["bottleneck"] == "loader" and facts["workers"] == 0, facts["line"]
    assert facts["workers_needed"] >= 2 and facts["step_images_per_s"] > 64  # batch 64
    assert facts["decodes"]["gpu"]["device_stage_images_per_s"] > 0


def test_a_large_model_on_in_memory_digits_is_the_bottleneck(one_thread):
    facts = bottleneck.check(
        [
            "trainer=cpu",
            "data=digits",
            "data.num_workers=0",
            "data.batch_size=16",
            "model=vit_s16",
            "model.img_size=64",
        ],
        gpu=False,
        batches=4,
        steps=2,
    )
    consistent(facts)
    assert facts["bottleneck"] == "step" and facts["workers_needed"] == 1
    assert facts["loader_images_per_s"] > 5 * facts["step_images_per_s"]
