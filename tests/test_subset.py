"""data.subset: fixed, class-balanced, nested training subsets (the data-size experiment),
the same for every training seed, on every source; val/test never change."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_helpers import data_cfg, pixel_ids, write_folder, write_parquet
from test_config import error_line
from vitexp.data import ImageDataModule
from vitexp.data.config import DataConfig, check_subset
from vitexp.data.sources import balanced_subset, subset_order
from vitexp.errors import ConfigError, DataError

MEAN0, STD1 = [0.0] * 3, [1.0] * 3


def dm_for(cfg: DataConfig, seed: int = 0) -> ImageDataModule:
    dm = ImageDataModule(cfg, (8, 8), MEAN0, STD1, seed=seed)
    dm.setup("fit")
    return dm


def source_indices(split) -> np.ndarray:
    """Indices into the source of a (nested) subset split."""
    if not hasattr(split, "base"):
        return np.arange(len(split))
    return source_indices(split.base)[split.indices]


def train_ids(dm: ImageDataModule) -> set[int]:
    return set(source_indices(dm._splits.train).tolist())


def fake_trainer(rank: int, world: int) -> SimpleNamespace:
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    return SimpleNamespace(global_rank=rank, world_size=world, strategy=cpu)


def epoch_ids(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
    return [pixel_ids(x) for x, _ in loader]


# --- the order: balanced, nested ------------------------------------------------------------
def test_every_prefix_is_balanced_and_nested():
    labels = np.repeat([0, 1, 2, 3], [10, 3, 7, 1])  # uneven classes
    order = subset_order(labels, 0)
    assert sorted(order.tolist()) == list(range(len(labels)))  # every index once
    previous: set[int] = set()
    for n in range(1, len(labels) + 1):
        kept = balanced_subset(labels, n, 0)
        assert set(previous) <= set(kept.tolist()) and len(kept) == n  # nested
        previous = set(kept.tolist())
        counts = np.bincount(labels[kept], minlength=4)
        sizes = np.bincount(labels)
        # every class has min(its size, L) or min(its size, L + 1) images for one level L
        level = counts[counts < sizes].min() if (counts < sizes).any() else sizes.max()
        fair = (counts == np.minimum(sizes, level)) | (counts == np.minimum(sizes, level + 1))
        assert fair.all(), (n, counts)
    # 12 images: 3 each, class 3 has only 1, so its 2 go to the classes with more
    assert np.bincount(labels[balanced_subset(labels, 12, 0)]).tolist() == [4, 3, 4, 1]
    assert not np.array_equal(subset_order(labels, 0), subset_order(labels, 1))
    assert np.array_equal(subset_order(labels, 3), subset_order(labels, 3))


# --- digits ------------------------------------------------------------------------------
def test_same_images_for_every_training_seed_and_model():
    a = dm_for(data_cfg(subset=300), seed=0)
    b = dm_for(data_cfg(subset=300), seed=7)  # another training seed
    assert train_ids(a) == train_ids(b) and len(train_ids(a)) == 300
    other = dm_for(data_cfg(subset=300, subset_seed=1))
    assert train_ids(other) != train_ids(a)  # subset_seed picks the images


def test_nested_subsets_and_counts():
    full = dm_for(data_cfg())
    assert full.train_images == 1294
    sizes = {}
    previous: set[int] = set()
    for subset in (10, 100, 0.25, 500, 0.5, 1294, 1.0):
        dm = dm_for(data_cfg(subset=subset))
        ids = train_ids(dm)
        assert previous <= ids  # growing data only adds images
        previous = ids
        sizes[subset] = dm.train_images
        assert dm.train_images == len(ids) == len(dm.split_labels("train"))
        assert ids <= train_ids(full)  # from the training split only
    assert sizes == {10: 10, 100: 100, 0.25: 324, 500: 500, 0.5: 647, 1294: 1294, 1.0: 1294}
    assert dm_for(data_cfg(subset=1)).train_images == 1


def test_class_balance_on_digits():
    for subset, allowed in ((100, {10}), (95, {9, 10}), (0.5, {64, 65})):
        counts = np.bincount(dm_for(data_cfg(subset=subset)).split_labels("train"), minlength=10)
        assert set(counts.tolist()) <= allowed, (subset, counts)


def test_val_and_test_never_change():
    full = dm_for(data_cfg())
    for subset in (50, 0.3):
        dm = dm_for(data_cfg(subset=subset))
        for split in ("val", "test"):
            assert torch.equal(dm.split_labels(split), full.split_labels(split))
            a, b = getattr(dm._splits, split), getattr(full._splits, split)
            assert np.array_equal(source_indices(a), source_indices(b))
        assert not train_ids(dm) & set(source_indices(full._splits.test).tolist())


def test_subset_loader_and_log_line(caplog):
    dm = dm_for(data_cfg(subset=40, batch_size=8))
    with caplog.at_level(logging.INFO, logger="vitexp"):
        loader = dm.train_dataloader()
        dm.train_dataloader()  # logged once
    lines = [r.getMessage() for r in caplog.records if "data.subset" in r.getMessage()]
    assert lines == ["data.subset=40: 40 of 1294 training images (class-balanced, subset_seed 0)"]
    assert len(loader) == 5
    with pytest.raises(DataError, match=r"^data.batch_size=64 is larger than the 40 train"):
        dm_for(data_cfg(subset=40, batch_size=64)).train_dataloader()


def test_too_large_subset_is_one_line():
    msg = (
        r"^data.subset=5000 is more than the 1294 training images of data.source=digits "
        r"\(after the validation/test holdout\); lower data.subset$"
    )
    with pytest.raises(DataError, match=msg):
        dm_for(data_cfg(subset=5000))


# --- checks ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,expect",
    [
        ("data.subset=0", "data.subset=0 must be null (all training images), an int >= 1"),
        ("data.subset=-3", "data.subset=-3 must be null"),
        ("data.subset=1.5", "data.subset=1.5 must be null"),
        ("data.subset=0.0", "data.subset=0.0 must be null"),
        ("data.subset=1e3", "data.subset=1000.0 must be null"),
        ("data.subset=true", "data.subset=True must be null"),
        ("data.subset=many", "data.subset='many' must be null"),
        ("data.subset=[1,2]", "data.subset=[1, 2] must be null"),
        ("data.subset_seed=-1", "data.subset_seed=-1 must be an int >= 0"),
    ],
)
def test_bad_values_are_one_line_config_errors(override, expect):
    line = error_line([override])
    assert line.startswith(expect), line
    assert "\n" not in line


def test_good_values_and_fraction_on_a_stream():
    for value in ("null", "1", "1000", "0.5", "1.0"):
        assert error_line([f"data.subset={value}", "data.subset_seed=3"]) == ""
    stream = ["data=hf", "data.dataset=parquet", "data.streaming=true", "data.num_classes=3"]
    line = error_line([*stream, "data.subset=0.5"])
    assert "data.subset=0.5 is a fraction, but data.streaming=true" in line
    assert "give a number of images" in line and "\n" not in line
    assert error_line([*stream, "data.subset=100"]) == ""
    fewshot = error_line(["fewshot.data.subset=0"])
    assert "fewshot.data.subset=0 must be null" in fewshot
    with pytest.raises(ConfigError, match="data.subset=False"):
        check_subset(data_cfg(subset=False))
    with pytest.raises(DataError, match="^data.subset=2.0 must be null"):
        dm_for(data_cfg(subset=2.0))  # a DataConfig built without validate()


# --- other sources -----------------------------------------------------------------------
def test_imagefolder_subset(tmp_path):
    write_folder(tmp_path / "train", {"a": 8, "b": 8, "c": 8})  # ids 0..23, 8 per class
    write_folder(tmp_path / "test", {"a": 2, "b": 2, "c": 2}, start=100)
    cfg = dict(source="imagefolder", root=str(tmp_path), num_classes=3, batch_size=3)
    full = dm_for(data_cfg(**cfg))
    assert full.train_images == 22  # 24 less 2 held out for val
    small, large = dm_for(data_cfg(**cfg, subset=6)), dm_for(data_cfg(**cfg, subset=0.5))
    assert small.train_images == 6 and large.train_images == 11
    assert small.split_labels("train").bincount().tolist() == [2, 2, 2]
    small_ids = {i for x, _ in small.train_dataloader() for i in pixel_ids(x)}
    large_ids = {i for x, _ in large.train_dataloader() for i in pixel_ids(x)}
    assert len(small_ids) == 6 and small_ids <= large_ids <= set(range(24))
    val_ids = {i for x, _ in full.val_dataloader() for i in pixel_ids(x)}
    assert not small_ids & val_ids
    for split in ("val", "test"):
        assert torch.equal(small.split_labels(split), full.split_labels(split))


def test_hf_in_memory_subset(tmp_path, hf_offline):
    write_parquet(tmp_path / "train.parquet", range(0, 30))
    write_parquet(tmp_path / "test.parquet", range(100, 106))
    files = {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}
    cfg = dict(source="hf", data_files=files, num_classes=3, batch_size=3)
    full = dm_for(data_cfg(**cfg))
    dm = dm_for(data_cfg(**cfg, subset=9))
    assert dm.train_images == 9 and dm.split_labels("train").bincount().tolist() == [3, 3, 3]
    ids = [i for x, _ in dm.train_dataloader() for i in pixel_ids(x)]
    assert len(set(ids)) == 9 and set(ids) <= set(range(30))
    assert [i % 3 for i in sorted(ids)].count(0) == 3  # label = id % 3
    larger = {
        i for x, _ in dm_for(data_cfg(**cfg, subset=15)).train_dataloader() for i in pixel_ids(x)
    }
    assert set(ids) <= larger
    for split in ("val", "test"):
        assert torch.equal(dm.split_labels(split), full.split_labels(split))
    with pytest.raises(DataError, match=r"^data.subset=28 is more than the 27 training images"):
        dm_for(data_cfg(**cfg, subset=28))


def _stream_dm(tmp_path, seed: int = 0, **overrides) -> ImageDataModule:
    """Two shards, rows 0..39 (label id % 3); rows 0..3 val, 4..7 test (the held-out head)."""
    for k in range(2):
        path = tmp_path / f"part{k}.parquet"
        if not path.exists():
            write_parquet(path, range(20 * k, 20 * k + 20))
    files = {"train": [str(tmp_path / f"part{k}.parquet") for k in range(2)]}
    cfg = dict(source="hf", dataset="parquet", data_files=files, num_classes=3, streaming=True)
    cfg.update(test_split=None, val_size=4, shuffle_buffer=5, batch_size=3)
    cfg.update(overrides)
    return dm_for(data_cfg(**cfg), seed=seed)


def test_stream_subset_is_the_first_rows_every_epoch(tmp_path, hf_offline, caplog):
    assert _stream_dm(tmp_path).train_images == 32  # counted in the footers: 40 less 8 held
    dm = _stream_dm(tmp_path, subset=12)
    assert dm.train_images == 12
    assert pixel_ids(next(iter(dm.val_dataloader()))[0]) == [0, 1, 2]  # unchanged head
    assert dm.split_labels("test").tolist() == [1, 2, 0, 1]
    with caplog.at_level(logging.INFO, logger="vitexp"):
        loader = dm.train_dataloader()
    lines = [r.getMessage() for r in caplog.records if "data.subset" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("data.subset=12: the first 12 rows of the unshuffled stream")
    assert "after its 8 held-out head rows" in lines[0]
    e0, e0_again, e1 = (epoch_ids(loader, e) for e in (0, 0, 1))
    flat = [[i for b in e for i in b] for e in (e0, e1)]
    assert e0 == e0_again and flat[0] != flat[1]  # reshuffled each epoch, deterministically
    assert sorted(flat[0]) == sorted(flat[1]) == list(range(8, 20))  # the same 12 rows
    assert all(len(b) == 3 for b in e0) and len(e0) == 4
    # another training seed: another order of the same rows
    other = [
        i for b in epoch_ids(_stream_dm(tmp_path, 1, subset=12).train_dataloader(), 0) for i in b
    ]
    assert sorted(other) == list(range(8, 20)) and other != flat[0]
    # a larger subset holds the smaller one
    larger = epoch_ids(_stream_dm(tmp_path, subset=24).train_dataloader(), 0)
    assert sorted(i for b in larger for i in b) == list(range(8, 32))


@pytest.mark.parametrize("world,workers", [(2, 0), (3, 2)])
def test_stream_subset_across_ranks_equal_batches(tmp_path, hf_offline, world, workers):
    dm = _stream_dm(tmp_path, subset=20, batch_size=3, num_workers=workers)
    per_rank = []
    for rank in range(world):
        dm.trainer = fake_trainer(rank, world)
        per_rank.append(epoch_ids(dm.train_dataloader(), 2))
    assert len({len(r) for r in per_rank}) == 1  # the same number of batches on every rank
    assert len(per_rank[0]) == (20 // world) // 3
    rows = [i for r in per_rank for b in r for i in b]
    assert len(rows) == len(set(rows)) and set(rows) <= set(range(8, 28))  # disjoint, subset


def test_stream_subset_errors(tmp_path, hf_offline):
    with pytest.raises(DataError, match=r"^data.subset=0.5 is a fraction, but data.streaming"):
        _stream_dm(tmp_path, subset=0.5)
    with pytest.raises(DataError, match=r"^data.batch_size=3 is larger than the 2 train"):
        _stream_dm(tmp_path, subset=2).train_dataloader()
    msg = (
        r"^data.subset=50 is more than the 32 training rows of data.dataset=parquet\[train\] "
        r"\(after the held-out head\); lower data.subset$"
    )
    with pytest.raises(DataError, match=msg):  # known at setup: the footers count the rows
        _stream_dm(tmp_path, subset=50)


# --- end to end ------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_records_the_subset(tmp_path):
    from test_train import train

    results = train(tmp_path / "run", "data.subset=200", "fewshot.enabled=false")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["train_images"] == results["train_images"] == 200
    assert saved["data_subset"] == 200 and saved["steps"] == 4
    log = (tmp_path / "run" / "train.log").read_text()
    assert "data.subset=200: 200 of 256 training images (class-balanced, subset_seed 0)" in log


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_subset_exact_resume(tmp_path, hf_offline, workers):
    full = epoch_ids(_stream_dm(tmp_path, subset=15, num_workers=workers).train_dataloader(), 3)
    assert len(full) == 5 and sorted(i for b in full for i in b) == list(range(8, 23))
    resumed = _stream_dm(tmp_path, subset=15, num_workers=workers).train_dataloader()
    state = {"epoch": 3, "batches": 2, "batch_size": 3, "world_size": 1, "num_workers": workers}
    resumed.load_state_dict(state)
    assert [pixel_ids(x) for x, _ in resumed] == full[2:]
