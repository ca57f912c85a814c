"""`data=litdata`: a pack streamed with litdata gives every rank the same number of whole
batches and every kept row once per epoch, reshuffles by (seed, epoch), resumes mid-epoch
exactly, seeds each image's augmentation by (seed, epoch, index), and refuses a missing,
half-written or damaged pack in one line; a 2-rank DDP run killed mid-epoch and resumed
ends as the uninterrupted one."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from litdata.utilities.env import _DistributedEnv
from PIL import Image

from data_helpers import data_cfg, pixel_ids, write_folder
from run_helpers import finish, results, wait_for_checkpoint
from vitexp.config import validate
from vitexp.data import ImageDataModule
from vitexp.data.config import AugmentConfig
from vitexp.data.litdata import STATE_DIR
from vitexp.data.pack import PackCommandConfig, pack
from vitexp.errors import ConfigError, DataError

# 4 classes x 30 solid PNGs valued 0..119: held out 24 test, 10 val; 86 train
CLASSES = {"c0": 30, "c1": 30, "c2": 30, "c3": 30}


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    """(the pack, its source folder)."""
    base = tmp_path_factory.mktemp("litdata")
    write_folder(base / "src", CLASSES)
    src, out = str(base / "src"), str(base / "pack")
    pack(PackCommandConfig(src=src, out=out, chunk_bytes="700B", progress=False))
    return base / "pack", base / "src"


def dm(root: Path, seed: int = 5, **overrides) -> ImageDataModule:
    cfg = data_cfg(source="litdata", root=str(root), **overrides)
    module = ImageDataModule(cfg, (8, 8), [0.0] * 3, [1.0] * 3, seed=seed)
    module.setup("fit")
    return module


def fake_trainer(rank: int, world: int) -> SimpleNamespace:
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    return SimpleNamespace(global_rank=rank, world_size=world, strategy=cpu)


def rank_loader(module: ImageDataModule, rank: int, world: int, monkeypatch=None):
    module.trainer = fake_trainer(rank, world)
    if monkeypatch is not None:  # what litdata's load_state_dict sees under DDP
        detect = classmethod(lambda cls: cls(world_size=world, global_rank=rank, num_nodes=1))
        monkeypatch.setattr(_DistributedEnv, "detect", detect)
    return module.train_dataloader()


def epoch_batches(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
    return [pixel_ids(x) for x, _ in loader]


def train_ids(root: Path) -> set[int]:
    """The solid values of the pack's train images (value = name's position in the folder)."""
    from litdata import StreamingDataset

    ds = StreamingDataset(str(root / "train"))
    return {
        int(np.asarray(Image.open(io.BytesIO(bytes(ds[i][0]))))[0, 0, 0]) for i in range(len(ds))
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_equal_whole_batches_on_every_rank_and_every_row_once_per_epoch(packed, workers):
    root, _ = packed
    module = dm(root, batch_size=4, num_workers=workers)
    assert module.train_images == 86 and module.batches_per_epoch(2) == 10  # 86 // (4 x 2)
    ids = train_ids(root)
    seen = {}
    for epoch in (0, 1):
        ranks = []
        for rank in (0, 1):
            loader = rank_loader(module, rank, 2)
            assert len(loader) == 10
            ranks.append(epoch_batches(loader, epoch))
        assert [len(r) for r in ranks] == [10, 10]
        assert all(len(b) == 4 for r in ranks for b in r)
        rows = [i for r in ranks for b in r for i in b]
        assert len(rows) == len(set(rows)) == 80 and set(rows) <= ids  # 6 left out, none twice
        seen[epoch] = ranks
    assert seen[0] != seen[1]  # reshuffled every epoch
    again = dm(root, batch_size=4, num_workers=workers)
    assert [epoch_batches(rank_loader(again, r, 2), 1) for r in (0, 1)] == seen[1]
    other = dm(root, seed=6, batch_size=4, num_workers=workers)
    assert [epoch_batches(rank_loader(other, r, 2), 1) for r in (0, 1)] != seen[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_exactly_the_rest_of_the_epoch(
    packed, monkeypatch, tmp_path, workers
):
    root, _ = packed
    module = dm(root, batch_size=4, num_workers=workers)
    full = epoch_batches(rank_loader(module, 1, 2, monkeypatch), 3)
    for k in (1, 7):
        killed = rank_loader(module, 1, 2, monkeypatch)
        killed.sampler.set_epoch(3)
        batches = iter(killed)
        assert [pixel_ids(next(batches)[0]) for _ in range(k)] == full[:k]
        state = killed.state_dict()  # what Lightning saves in a checkpoint after k batches
        del batches
        state = torch.load(_saved(state), weights_only=True)  # as a checkpoint stores it
        resumed = rank_loader(module, 1, 2, monkeypatch)
        resumed.load_state_dict(state)
        resumed.sampler.set_epoch(3)  # Lightning sets the restored epoch again
        assert [pixel_ids(x) for x, _ in resumed] == full[k:]
        assert epoch_batches(resumed, 4) == epoch_batches(rank_loader(module, 1, 2), 4)
    # the same pack elsewhere (a requeued job's copy on local scratch) resumes; another not
    moved = dm(_copy(root, tmp_path), batch_size=4, num_workers=workers)
    resumed = rank_loader(moved, 1, 2, monkeypatch)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(3)
    assert [pixel_ids(x) for x, _ in resumed] == full[7:]
    other = tmp_path / "other"
    write_folder(other / "src", {"a": 20, "b": 20})
    pack(PackCommandConfig(src=str(other / "src"), out=str(other / "pack"), progress=False))
    with pytest.raises(DataError, match="read another pack than data.root=.*other/pack"):
        rank_loader(dm(other / "pack", batch_size=4), 1, 2, monkeypatch).load_state_dict(state)


def _saved(state: dict):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def _digests(module: ImageDataModule, epoch: int) -> list[str]:
    tensors = [x for r in (0, 1) for b, _ in _iter(rank_loader(module, r, 2), epoch) for x in b]
    return sorted(hashlib.sha1(t.numpy().tobytes()).hexdigest() for t in tensors)


def _iter(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return iter(loader)


def test_each_images_augmentation_depends_on_seed_epoch_and_index_only(packed):
    """Random crops and flips: whatever rank or loader worker reads an image, it gets the
    same crop in the same epoch (the same kept rows, any worker count), another next epoch."""
    root, _ = packed
    aug = AugmentConfig(random_resized_crop=True, hflip=True, scale_min=0.3)
    one = _digests(dm(root, batch_size=4, num_workers=0, augment=aug), 2)
    two = _digests(dm(root, batch_size=4, num_workers=2, augment=aug), 2)
    assert one == two and len(set(one)) > 40
    assert _digests(dm(root, batch_size=4, num_workers=0, augment=aug), 3) != one


def test_val_and_test_give_every_row_once_across_ranks(packed):
    root, _ = packed
    module = dm(root, batch_size=4, num_workers=2)
    for split, size in (("val", 10), ("test", 24)):
        got = []
        for rank in range(3):
            module.trainer = fake_trainer(rank, 3)
            loader = getattr(module, f"{split}_dataloader")()
            got.append(
                [(i, int(y)) for x, ys in loader for i, y in zip(pixel_ids(x), ys, strict=True)]
            )
        flat = [i for r in got for i, _ in r]
        assert len(flat) == len(set(flat)) == size
        assert all(y == i // 30 for r in got for i, y in r)  # class folders of 30 images
    labels = module.split_labels("train").tolist()  # few-shot pools: labels without decoding
    raw = module.raw_split("train")  # and their images by index
    ids = [int(np.asarray(raw[j][0])[0, 0, 0]) for j in range(len(raw))]
    assert len(labels) == 86 and labels == [i // 30 for i in ids]


def test_class_names_and_counts_come_from_the_pack(packed):
    root, _ = packed
    module = dm(root)
    assert module.class_names == ["c0", "c1", "c2", "c3"] and module.num_classes == 4
    with pytest.raises(DataError, match=r"data.num_classes=10 but data.root=.* has 4 classes"):
        dm(root, num_classes=10)
    module = dm(root, batch_size=50)
    with pytest.raises(DataError, match=r"data.batch_size=50 is larger than the 43 train"):
        module.check_batch_size(2)  # 86 images: 2 ranks x 50 would leave each none
    module.check_batch_size(1)
    assert module.batches_per_epoch(1) == 1


def _copy(root: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def test_missing_half_written_and_foreign_packs_are_one_line(packed, tmp_path):
    root, _ = packed
    cases = {
        tmp_path / "nowhere": r"data.root=.*nowhere does not exist; pack the data there first",
        tmp_path: r"holds no vitexp pack \(vitexp_pack.json\); make one: python -m vitexp.pack",
    }
    half = _copy(root, tmp_path)
    (half / "vitexp_pack.json").unlink()
    (half / STATE_DIR).mkdir()
    cases[half] = r"is a pack that did not finish \(no vitexp_pack.json\); re-run the same"
    for where, pattern in cases.items():
        with pytest.raises(DataError, match=pattern) as err:
            dm(where)
        assert "\n" not in str(err.value)


def test_a_truncated_or_missing_chunk_is_found_before_training(packed, tmp_path):
    root, _ = packed
    copy = _copy(root, tmp_path)
    chunk = sorted((copy / "train").glob("chunk-*.bin"))[1]
    os.truncate(chunk, 100)
    with pytest.raises(DataError) as err:
        dm(copy)
    message = str(err.value)
    assert f"train/{chunk.name} is 100 bytes, its index says" in message
    assert f"re-pack it: delete {copy} and run python -m vitexp.pack src=" in message
    chunk.unlink()
    with pytest.raises(DataError, match=rf"train/{chunk.name} is missing"):
        dm(copy)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_chunk_that_fails_to_read_is_one_line_naming_it(packed, tmp_path, workers):
    root, _ = packed
    copy = _copy(root, tmp_path)
    for split in ("train", "val"):
        chunk = sorted((copy / split).glob("chunk-*.bin"))[0]
        data = bytearray(chunk.read_bytes())
        data[0:8] = b"\xff" * 8  # its header: the item count and first offset
        chunk.write_bytes(bytes(data))
    module = dm(copy, num_workers=workers)
    with pytest.raises(DataError) as err:
        list(rank_loader(module, 0, 1))
    assert "\n" not in str(err.value) and "the train split failed to read" in str(err.value)
    assert "chunk-0-0.bin" in str(err.value) and "re-pack it" in str(err.value)
    module.trainer = fake_trainer(0, 1)
    with pytest.raises(DataError, match=r"chunk val/chunk-0-0.bin failed to read .*re-pack it"):
        list(module.val_dataloader())


def test_data_subset_is_refused_for_a_pack(packed):
    root, _ = packed
    with pytest.raises(DataError, match="data.subset=10 is not supported with data.source=litdata"):
        dm(root, subset=10)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vitexp.config import CONFIG_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for overrides, pattern in (
            ([f"data.root={root}", "data.subset=10"], r"data.subset=10 is not supported.*litdata"),
            ([], r"data.root is not set; data.source=litdata"),
        ):
            with pytest.raises(ConfigError, match=pattern):
                validate(compose("train", overrides=["data=litdata", *overrides]))
        assert validate(compose("train", overrides=["data=litdata", f"data.root={root}"]))
    GlobalHydra.instance().clear()


# --- a real DDP run, killed and resumed ---------------------------------------------------------
RUN = [
    "data=litdata",
    "data.batch_size=8",  # 121 train images: 7 batches per rank and epoch on 2 ranks
    "data.num_workers=2",
    "model.depth=2",
    "model.embed_dim=32",
    "model.drop_rate=0.1",  # dropout: the RNG state must resume too
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.max_steps=12",  # epoch 0 is steps 1-7, epoch 1 steps 8-14
    "trainer.max_epochs=null",
    "trainer.val_check_interval=5",
    "trainer.check_val_every_n_epoch=null",
    "trainer.checkpoint_every_n_steps=3",
    "trainer.progress_bar=false",
    "trainer.ddp_timeout_s=120",
    "schedule.warmup_steps=4",
    "fewshot.enabled=false",
    "figures=false",
    "data.augment.randaugment.num_ops=2",  # random crops, flips, RandAugment: seeded per image
    "data.augment.mixup_alpha=0.8",
]


def _start(run_dir: Path, root: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vitexp.train", *RUN, f"data.root={root}",
         f"hydra.run.dir={run_dir}", *extra],
        cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_pack_train_on_two_ranks_sigkill_mid_epoch_resume_equals_uninterrupted(tmp_path):
    src, root = tmp_path / "src", tmp_path / "pack"
    rng = np.random.default_rng(0)
    for c in range(4):  # 168 JPEGs, 40x30: 121 train, 13 val, 34 test
        (src / f"c{c}").mkdir(parents=True)
        for i in range(42):
            pixels = np.full((30, 40, 3), 50 * c, np.uint8) + rng.integers(
                0, 60, (30, 40, 3), np.uint8
            )
            Image.fromarray(pixels).save(src / f"c{c}" / f"{i}.jpg", quality=90)
    packed = subprocess.run(
        [sys.executable, "-m", "vitexp.pack", f"src={src}", f"out={root}", "chunk_bytes=8KB"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr[-2000:]
    assert "train 121, val 13, test 34 images" in packed.stdout
    whole = tmp_path / "whole"
    out = finish(_start(whole, root))
    uninterrupted = results(whole)
    assert uninterrupted["steps"] == 12 and uninterrupted["world_size"] == 2, out[-2000:]
    assert uninterrupted["train_images"] == 121

    run_dir = tmp_path / "killed"
    proc = _start(run_dir, root)
    wait_for_checkpoint(run_dir, 9, timeout=240)  # epoch 1, its 2nd batch: mid-epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "results.json").exists()
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    # a mid-epoch checkpoint: 9 (every 3 steps) or 10 (a validation) when the kill lands late
    assert 9 <= step < 12 and step % 7
    out = finish(_start(run_dir, root, "ckpt_path=last"))
    resumed = results(run_dir)
    assert resumed["resumed_at_step"] == step and resumed["steps"] == 12
    for key, value in uninterrupted["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, abs=1e-6), (key, out[-2000:])

    # and the same pack, half-written: one line, exit 2, no run directory
    (root / "vitexp_pack.json").rename(root / "moved.json")
    (root / STATE_DIR).mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "vitexp.train", *RUN, f"data.root={root}",
         f"hydra.run.dir={tmp_path / 'refused'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: data.root={root} is a pack that did not finish (no vitexp_pack.json); re-run "
        "the same python -m vitexp.pack command: it continues where it stopped"
    ]
    assert not (tmp_path / "refused").exists()
    json.loads((root / "moved.json").read_text())  # untouched
