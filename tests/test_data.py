"""vitexp.data: every source on small local files, image decoding, transforms, the shapes
dataset's position property, and deterministic, resumable loading."""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import (
    NO_AUG,
    data_cfg,
    pixel_ids,
    png_bytes,
    write_cifar,
    write_folder,
    write_parquet,
)
from vitexp.data import ImageDataModule, build_transforms
from vitexp.data import shapes as shapes_lib
from vitexp.data.config import AugmentConfig, ShapesConfig
from vitexp.data.datamodule import EpochSampler
from vitexp.data.images import ImageDecoder, to_rgb
from vitexp.data.sources import holdout
from vitexp.errors import DataError

MEAN0, STD1 = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


def dm_for(cfg, img_size=(8, 8), mean=MEAN0, std=STD1, seed=0) -> ImageDataModule:
    dm = ImageDataModule(cfg, img_size, mean, std, seed=seed)
    dm.setup("fit")
    return dm


def fake_trainer(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(
        global_rank=rank,
        world_size=world,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )


# --- transforms --------------------------------------------------------------------------
def test_transforms_shape_dtype_and_normalisation_non_square():
    img = Image.new("RGB", (50, 30), (255, 0, 51))
    for train in (True, False):
        t = build_transforms(AugmentConfig(), (24, 40), [0.5, 0.5, 0.2], [0.5, 0.25, 0.2], train)
        x = t(img)
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, 24, 40)
        # (v / 255 - mean) / std per channel, on a solid image that no resize changes
        assert torch.allclose(x[0], torch.tensor(1.0)) and torch.allclose(x[1], torch.tensor(-2.0))
        assert torch.allclose(x[2], torch.tensor(0.0), atol=1e-6)


def test_eval_transform_crops_by_crop_pct():
    img = Image.new("RGB", (64, 64), (255, 0, 0))
    img.paste((0, 255, 0), (16, 16, 48, 48))  # a green centre inside a red border
    cropped = build_transforms(AugmentConfig(crop_pct=0.5), (32, 32), MEAN0, STD1, False)(img)
    assert cropped.shape == (3, 32, 32) and cropped[0].max() < 0.05  # only the centre is left
    whole = build_transforms(AugmentConfig(crop_pct=1.0), (32, 32), MEAN0, STD1, False)(img)
    assert whole[0, 0, 0] > 0.95 and whole[1, 16, 16] > 0.95  # exact resize keeps the border


def test_train_augmentation_is_random_and_seedable():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    t = build_transforms(AugmentConfig(scale_min=0.2), (16, 16), MEAN0, STD1, True)
    torch.manual_seed(1)
    a = t(img)
    torch.manual_seed(1)
    assert torch.equal(a, t(img))
    assert not torch.equal(a, t(img))
    plain = build_transforms(NO_AUG, (16, 16), MEAN0, STD1, True)
    assert torch.equal(plain(img), plain(img))


# --- digits ------------------------------------------------------------------------------
def test_digits_stratified_disjoint_splits_and_batches():
    dm = dm_for(data_cfg(batch_size=16), img_size=(32, 32), mean=[0.5] * 3, std=[0.5] * 3)
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    labels = {s: dm.split_labels(s) for s in ("train", "val", "test")}
    assert [len(v) for v in labels.values()] == [1294, 144, 359]  # 1797: 20% test, 10% of rest
    idx = [set(_source_indices(getattr(dm._splits, s)).tolist()) for s in ("train", "val", "test")]
    assert not idx[0] & idx[1] and not idx[1] & idx[2] and len(set().union(*idx)) == 1797
    all_counts = np.bincount(np.concatenate([v.numpy() for v in labels.values()]))
    test_counts = np.bincount(labels["test"].numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1)  # stratified
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and torch.equal(x[:, 0], x[:, 2])  # grey in 3 channels
    assert x.max() > 0.9 and x.min() < -0.9  # 0..16 reached 0..255 before normalising


def _source_indices(split) -> np.ndarray:
    """Indices into the source of a (nested) held-out subset."""
    if not hasattr(split, "base"):
        return np.arange(len(split))
    return _source_indices(split.base)[split.indices]


def test_class_count_mismatch_names_the_fix():
    msg = r"data.num_classes=5 but data.source=digits has 10 classes \(0, 1, .*9\); set data.num"
    with pytest.raises(DataError, match=msg + r"_classes=10$"):
        dm_for(data_cfg(num_classes=5))


def test_holdout_is_seeded_stratified_and_never_empty():
    labels = np.repeat(np.arange(3), 4)
    keep, held = holdout(labels, 0.1, [0, 1])
    assert len(held) == 1 and len(keep) == 11 and not set(keep) & set(held)
    keep, held = holdout(labels, 0.5, [0, 1])
    assert np.bincount(labels[held]).tolist() == [2, 2, 2]
    assert np.array_equal(held, holdout(labels, 0.5, [0, 1])[1])
    assert not np.array_equal(held, holdout(labels, 0.5, [1, 1])[1])


# --- shapes ------------------------------------------------------------------------------
def test_shapes_deterministic_by_seed_and_split():
    def pixels(seed, split="train"):
        ds = shapes_lib.ShapesDataset(8, 64, (32, 32), seed, split)
        return np.stack([np.asarray(ds[i][0]) for i in range(8)])

    assert np.array_equal(pixels(0), pixels(0))
    assert not np.array_equal(pixels(0), pixels(1))
    assert not np.array_equal(pixels(0), pixels(0, "val"))


def test_shapes_cache_file_holds_the_same_images_and_is_made_once(tmp_path: Path):
    plain = shapes_lib.ShapesDataset(40, 32, (32, 32), 3, "val")
    cached = shapes_lib.ShapesDataset(40, 32, (32, 32), 3, "val", tmp_path)
    [file] = tmp_path.iterdir()
    assert file.name == "shapes-v1-val-seed3-32c-32x32-40.npy"
    made = file.stat().st_mtime_ns
    again = pickle.loads(
        pickle.dumps(shapes_lib.ShapesDataset(40, 32, (32, 32), 3, "val", tmp_path))
    )
    assert file.stat().st_mtime_ns == made and list(tmp_path.iterdir()) == [file]  # reused
    for i in (0, 17, 39):
        a, b, c = plain[i], cached[i], again[i]
        assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1] == b[1] == c[1]
        assert np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    file.write_bytes(b"not an array")  # damaged (or from an older render): made again
    fixed = shapes_lib.ShapesDataset(40, 32, (32, 32), 3, "val", tmp_path)
    assert np.array_equal(np.asarray(fixed[5][0]), np.asarray(plain[5][0]))


def test_fused_tensor_step_equals_torchvision_and_marks_randomness():
    from torchvision.transforms import v2

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    reference = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    )
    fused = build_transforms(NO_AUG, (20, 30), mean, std, train=True)
    assert torch.allclose(fused(img), reference(img), atol=1e-6)
    grey = img.convert("L")
    assert torch.allclose(fused(grey), reference(grey.convert("RGB")), atol=1e-6)
    assert (
        not fused.is_random
        and not build_transforms(AugmentConfig(), (8, 8), mean, std, False).is_random
    )
    assert build_transforms(AugmentConfig(), (8, 8), mean, std, True).is_random


def test_shapes_labels_names_and_class_limits():
    ds = shapes_lib.ShapesDataset(130, 13, (32, 32), 0)
    assert np.bincount(ds.labels).tolist() == [10] * 13 and ds[14][1] == 1
    assert shapes_lib.class_names(6)[5] == "ring@top-right" and shapes_lib.MAX_CLASSES >= 32
    cfg = data_cfg(source="shapes", num_classes=64, shapes=ShapesConfig(8, 4, 4))
    assert dm_for(cfg).num_classes == 64
    with pytest.raises(DataError, match="at most 64 classes"):
        dm_for(data_cfg(source="shapes", num_classes=65))
    with pytest.raises(DataError, match="data.augment.hflip=false"):
        dm_for(data_cfg(source="shapes", augment=AugmentConfig()))


def test_shapes_same_type_in_two_quadrants_differs_only_there():
    for shape in range(len(shapes_lib.SHAPE_TYPES)):
        a, b = (
            np.asarray(shapes_lib.render(shape, r, (32, 32), np.random.default_rng([shape, 7])))
            for r in (0, 3)
        )
        diff = np.abs(a.astype(int) - b.astype(int)).sum(-1)  # same background, moved shape
        assert diff[:16, :16].sum() > 0 and diff[16:, 16:].sum() > 0
        assert diff[:15, 17:].sum() == 0 and diff[17:, :15].sum() == 0  # other quadrants untouched


def test_shapes_need_position_a_bag_of_patches_cannot_tell_quadrants_apart():
    """Per-patch statistics (mean colour, contrast) as a bag, which is all a position-free
    model has, do not separate "ring@top-left" from "ring@bottom-right"; the same features
    in grid order do."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    grid, bag, labels = [], [], []
    for i in range(400):
        region = 0 if i % 2 else 3
        img = np.asarray(shapes_lib.render(1, region, (32, 32), np.random.default_rng([9, i])))
        p = img.reshape(4, 8, 4, 8, 3) / 255.0  # 4x4 patches of 8x8 px
        stats = np.concatenate([p.mean((1, 3)), p.std((1, 3))], -1).reshape(16, 6)  # (16, 6)
        grid.append(stats.ravel())
        bag.append(stats[np.lexsort(stats.T[::-1])].ravel())  # patches sorted: order is lost
        labels.append(region)
    clf = LogisticRegression(C=10.0, max_iter=3000)
    positional = cross_val_score(clf, np.array(grid), labels, cv=4).mean()
    unordered = cross_val_score(clf, np.array(bag), labels, cv=4).mean()
    assert positional > 0.9 and unordered < 0.65, (positional, unordered)


# --- torchvision (fake CIFAR) ------------------------------------------------------------
@pytest.fixture
def no_md5(monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)


@pytest.mark.parametrize("name", ["CIFAR10", "CIFAR100"])
def test_cifar_from_local_batches(tmp_path, no_md5, name):
    names = write_cifar(tmp_path, hundred=name == "CIFAR100")
    cfg = data_cfg(source="torchvision", dataset=name, root=str(tmp_path), num_classes=len(names))
    dm = dm_for(cfg)
    assert dm.class_names == names
    assert [len(dm.split_labels(s)) for s in ("train", "val", "test")] == [45, 5, 10]
    x, _ = next(iter(dm.test_dataloader()))
    assert pixel_ids(x) == [(1000 + i) % 256 for i in range(4)]  # the official test batch


def test_cifar_errors_never_download(tmp_path, no_md5):
    cfg = dict(source="torchvision", dataset="CIFAR10")
    with pytest.raises(DataError, match="data.root is not set"):
        dm_for(data_cfg(**cfg))
    with pytest.raises(DataError, match=r"does not exist; .* or set data.download=true"):
        dm_for(data_cfg(**cfg, root=str(tmp_path / "nope")))
    msg = rf"data.root={tmp_path} does not contain CIFAR10 \(cifar-10-batches-py/\); put it there"
    with pytest.raises(DataError, match=msg):
        dm_for(data_cfg(**cfg, root=str(tmp_path)))
    with pytest.raises(DataError, match="data.dataset='MNIST'.*CIFAR10, CIFAR100"):
        dm_for(data_cfg(source="torchvision", dataset="MNIST", root=str(tmp_path)))


# --- imagefolder -------------------------------------------------------------------------
def test_imagefolder_flat_layout_extensions_and_mismatch(tmp_path):
    write_folder(tmp_path, {"fox": 6, "cat": 6})
    write_folder(tmp_path, {"dog": 6}, start=100, ext=".JPG")  # upper-case extension
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    msg = (
        rf"^data.num_classes=10 but data.root={tmp_path} has 3 classes \(cat, dog, fox\); "
        r"set data.num_classes=3$"
    )
    with pytest.raises(DataError, match=msg):  # given, and wrong
        dm_for(data_cfg(source="imagefolder", root=str(tmp_path), num_classes=10))
    assert dm_for(data_cfg(source="imagefolder", root=str(tmp_path))).num_classes == 3  # read
    dm = dm_for(data_cfg(source="imagefolder", root=str(tmp_path), num_classes=3))
    sizes = [len(dm.split_labels(s)) for s in ("train", "val", "test")]
    assert sizes == [13, 1, 4]  # 20% of 18 for test, 10% of the 14 left for val
    assert sorted(torch.bincount(dm.split_labels("test")).tolist()) == [1, 1, 2]  # stratified


@pytest.mark.parametrize("folders", [("train", "val"), ("train", "val", "test"), ("train",)])
def test_imagefolder_split_layouts(tmp_path, folders):
    for k, split in enumerate(folders):
        write_folder(tmp_path / split, {"a": 5, "b": 5}, start=50 * k)
    dm = dm_for(data_cfg(source="imagefolder", root=str(tmp_path), num_classes=2))
    test_ids = pixel_ids(next(iter(dm.test_dataloader()))[0])
    val_ids = pixel_ids(next(iter(dm.val_dataloader()))[0])
    if folders == ("train", "val"):  # val/ is the reported test set; val is held out of train
        assert all(50 <= v < 60 for v in test_ids) and all(v < 10 for v in val_ids)
    elif len(folders) == 3:
        assert all(100 <= v < 110 for v in test_ids) and all(50 <= v < 60 for v in val_ids)
    else:
        assert all(v < 10 for v in test_ids + val_ids)
        assert (
            len(dm.split_labels("train"))
            + len(dm.split_labels("test"))
            + len(dm.split_labels("val"))
            == 10
        )


def test_imagefolder_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="data.root is not set"):
        dm_for(data_cfg(source="imagefolder"))
    with pytest.raises(DataError, match=r"data.root=.*nope does not exist"):
        dm_for(data_cfg(source="imagefolder", root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="has no class folders"):
        dm_for(data_cfg(source="imagefolder", root=str(tmp_path)))
    write_folder(tmp_path, {"a": 3})
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"b has no images \(jpg/.*\); add images or remove"):
        dm_for(data_cfg(source="imagefolder", root=str(tmp_path), num_classes=2))
    write_folder(tmp_path / "x" / "train", {"a": 3})
    write_folder(tmp_path / "x" / "val", {"a": 1, "zebra": 1})
    with pytest.raises(DataError, match=r"class folders that train/ lacks \(zebra\)"):
        dm_for(data_cfg(source="imagefolder", root=str(tmp_path / "x"), num_classes=1))


# --- decoding: odd modes, huge and corrupt files -------------------------------------------
def test_odd_image_modes_become_rgb():
    decode = ImageDecoder()
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # transparent: composited on white
    pal = Image.new("P", (2, 2), 3)
    pal.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 252)
    cases = {
        "L": (png_bytes(Image.new("L", (3, 2), 77)), (77, 77, 77)),
        "P": (png_bytes(pal), (200, 100, 50)),
        "RGBA": (png_bytes(rgba), (255, 255, 255)),
        "LA": (png_bytes(Image.new("LA", (2, 2), (90, 0))), (255, 255, 255)),
        "CMYK": (png_bytes(Image.new("CMYK", (2, 2), (0, 0, 0, 0)), "JPEG"), (255, 255, 255)),
        "1": (png_bytes(Image.new("1", (2, 2), 1)), (255, 255, 255)),
    }
    for mode, (data, corner) in cases.items():
        img = decode(data, mode)
        assert img.mode == "RGB" and img.getpixel((img.width - 1, 0)) == corner, mode
    assert decode(png_bytes(rgba), "rgba").getpixel((0, 0)) == (10, 20, 30)
    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    img = decode(png_bytes(sixteen), "16-bit png")
    assert [img.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]  # scaled, not clipped
    as_i = to_rgb(Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I"))
    assert as_i.getpixel((1, 0)) == (255, 255, 255)
    as_f = to_rgb(Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32), mode="F"))
    assert as_f.getpixel((1, 0)) == (128, 128, 128)


def test_tiny_and_huge_images(tmp_path):
    tiny = ImageDecoder()(png_bytes(Image.new("L", (1, 1), 200)), "tiny")
    for train in (True, False):
        x = build_transforms(AugmentConfig(), (16, 24), MEAN0, STD1, train)(tiny)
        assert x.shape == (3, 16, 24) and torch.allclose(x, torch.tensor(200 / 255))
    big = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1600), (0, 90, 0)).save(big, quality=50)
    img = ImageDecoder(min_size=150)(str(big), str(big))  # JPEG draft: decoded at 1/8 scale
    assert img.size == (300, 200) and img.getpixel((5, 5))[1] > 80


def test_decompression_bomb_is_corrupt(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"bomb.*decompression-bomb limit of 100 pixels"):
        ImageDecoder()(png_bytes(Image.new("RGB", (20, 20))), "bomb.png")


def _corrupt_files(folder):
    good = png_bytes(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "garbage.png").write_bytes(b"\x89PNG not really" * 10)
    (folder / "empty.jpg").write_bytes(b"")


def test_corrupt_files_error_or_skip(tmp_path):
    _corrupt_files(tmp_path)
    for name in ("truncated.jpg", "garbage.png", "empty.jpg"):
        with pytest.raises(DataError, match=rf"{name}: unreadable image .*data.on_corrupt=skip$"):
            ImageDecoder("error")(str(tmp_path / name), str(tmp_path / name))
        with pytest.warns(
            UserWarning, match=rf"skipping unreadable image .*{name}.*skipped so far"
        ):
            assert ImageDecoder("skip")(str(tmp_path / name), str(tmp_path / name)) is None


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_files_in_loaders(tmp_path, workers):
    write_folder(tmp_path / "train" / "a", {"x": 3})
    write_folder(tmp_path / "test", {"a": 3})
    _corrupt_files(tmp_path / "test" / "a")
    cfg = dict(source="imagefolder", root=str(tmp_path), num_classes=1)
    cfg.update(batch_size=8, num_workers=workers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y = next(iter(dm_for(data_cfg(**cfg, on_corrupt="skip")).test_dataloader()))
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [0, 0, 0]  # the 3 corrupt files dropped
    with pytest.raises(DataError, match=r"^\S+(empty|truncated)\.jpg: unreadable image [^\n]*$"):
        next(iter(dm_for(data_cfg(**cfg, on_corrupt="error")).test_dataloader()))


# --- Hugging Face datasets -----------------------------------------------------------------


def test_hf_parquet_map_style(tmp_path, hf_offline):
    write_parquet(tmp_path / "train.parquet", range(0, 30))
    write_parquet(tmp_path / "test.parquet", range(100, 106))
    files = {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}
    dm = dm_for(data_cfg(source="hf", data_files=files, num_classes=3))  # builder: parquet
    assert dm.class_names == ["a", "b", "c"]
    assert [len(dm.split_labels(s)) for s in ("train", "val", "test")] == [27, 3, 6]
    x, y = next(iter(dm.test_dataloader()))
    assert pixel_ids(x) == [100, 101, 102, 103] and y.tolist() == [1, 2, 0, 1]
    x, y = dm.split_dataset("train")[0]
    assert x.shape == (3, 8, 8) and y == int(dm.split_labels("train")[0])
    with pytest.raises(DataError, match="data.val_split='validation' is not a split .*train, test"):
        dm_for(data_cfg(source="hf", data_files=files, num_classes=3, val_split="validation"))
    with pytest.raises(DataError, match="data.image_column='img' is not a column"):
        dm_for(data_cfg(source="hf", data_files=files, num_classes=3, image_column="img"))


def test_hf_imagefolder_and_load_errors(tmp_path, hf_offline):
    write_folder(tmp_path / "hfimg" / "train", {"cat": 4, "dog": 4})
    write_folder(tmp_path / "hfimg" / "test", {"cat": 2, "dog": 2}, start=200)
    cfg = data_cfg(source="hf", dataset="imagefolder", root=str(tmp_path / "hfimg"), num_classes=2)
    dm = dm_for(cfg)
    assert dm.class_names == ["cat", "dog"] and len(dm.split_labels("test")) == 4
    assert sorted(pixel_ids(next(iter(dm.test_dataloader()))[0])) == [200, 201, 202, 203]
    with pytest.raises(DataError, match=r"^data.dataset=nobody/nothing could not be loaded .*"):
        dm_for(data_cfg(source="hf", dataset="nobody/nothing"))


def _stream_dm(tmp_path, **overrides):
    for k in range(2):  # two shards
        write_parquet(tmp_path / f"part{k}.parquet", range(20 * k, 20 * k + 20))
    files = {"train": [str(tmp_path / f"part{k}.parquet") for k in range(2)]}
    cfg = dict(source="hf", dataset="parquet", data_files=files, num_classes=3, streaming=True)
    cfg.update(test_split=None, val_size=4, shuffle_buffer=8)
    cfg.update(overrides)
    return dm_for(data_cfg(**cfg))


def _epoch_ids(loader, epoch):
    loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
    return [i for x, _ in loader for i in pixel_ids(x)]


def test_hf_streaming_holdout_epochs_and_ranks(tmp_path, hf_offline):
    dm = _stream_dm(tmp_path)
    assert pixel_ids(next(iter(dm.val_dataloader()))[0]) == [0, 1, 2, 3]  # head of train
    assert dm.split_labels("test").tolist() == [1, 2, 0, 1]  # the next 4 rows, in memory
    loader = dm.train_dataloader()
    e0, e0_again, e1 = (_epoch_ids(loader, e) for e in (0, 0, 1))
    assert e0 == e0_again and e0 != e1  # reshuffled per epoch, deterministically
    assert sorted(e0) == list(range(8, 40))  # every row but the 8 held out, once
    shards = []
    for rank in range(2):
        dm.trainer = fake_trainer(rank, 2)
        shards.append(_epoch_ids(dm.train_dataloader(), 0))
    assert len(shards[0]) == len(shards[1]) == 16  # 32 rows: 4 batches of 4 on each rank
    assert sorted(shards[0] + shards[1]) == list(range(8, 40))
    with pytest.raises(DataError, match="streamed"):
        dm.split_labels("train")


def test_hf_streaming_resume_skips_consumed_batches(tmp_path, hf_offline):
    dm = _stream_dm(tmp_path)
    full = dm.train_dataloader()
    full.sampler.set_epoch(2)
    batches = [pixel_ids(x) for x, _ in full]
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 2, "batches": 3, "batch_size": 4, "world_size": 1})
    assert [pixel_ids(x) for x, _ in resumed] == batches[3:]


# --- sampling and loaders ------------------------------------------------------------------
def test_epoch_sampler_pure_function_of_seed_epoch_and_sharded():
    def run(rank=0, world=1, epoch=0, seed=0):
        s = EpochSampler(10, seed, rank, world)
        s.set_epoch(epoch)
        return list(s)

    assert run() == run() and run() != run(epoch=1) and run() != run(seed=1)
    assert sorted(i for i, _ in run()) == list(range(10))
    shards = [run(r, 3) for r in range(3)]
    assert (
        [len(s) for s in shards] == [4, 4, 4] == [len(EpochSampler(10, 0, r, 3)) for r in range(3)]
    )
    assert set().union(*({i for i, _ in s} for s in shards)) == set(range(10))  # 2 padded
    seed_of = dict(run())  # the augmentation seed is a function of (seed, epoch, index)
    assert all(seed_of[i] == s for shard in shards for i, s in shard)
    s = EpochSampler(10, 0)
    s.start_at(0, 2, 3)
    assert list(s) == run()[6:] and list(s) == run()  # skips once


def test_train_loader_same_batches_for_any_worker_count_and_new_each_epoch():
    cfg = dict(batch_size=8, augment=AugmentConfig(scale_min=0.3))
    firsts = []
    for workers in (0, 2):
        loader = dm_for(data_cfg(**cfg, num_workers=workers), img_size=(16, 16)).train_dataloader()
        assert loader.drop_last and loader.persistent_workers == (workers > 0)
        assert not loader.pin_memory and len(loader) == 1294 // 8
        loader.sampler.set_epoch(0)
        firsts.append(next(iter(loader)))
        loader.sampler.set_epoch(1)
        second = next(iter(loader))
    assert torch.equal(firsts[0][0], firsts[1][0]) and torch.equal(firsts[0][1], firsts[1][1])
    assert not torch.equal(firsts[1][0], second[0])


def test_eval_loaders_shard_without_padding():
    dm = dm_for(data_cfg(batch_size=1000), img_size=(8, 8))
    labels = dm.split_labels("test")
    got = []
    for rank in range(3):
        dm.trainer = fake_trainer(rank, 3)
        _, y = next(iter(dm.test_dataloader()))
        assert torch.equal(y, labels[rank::3])
        got.append(len(y))
    assert sum(got) == len(labels)
    dm.trainer = fake_trainer(0, 1)
    with pytest.raises(DataError, match="data.batch_size=2000 is larger"):
        dm.cfg.batch_size = 2000
        dm.train_dataloader()


class _Stop(Exception):
    pass


class _Recorder(L.LightningModule):
    """Records a hash of every training batch; raises _Stop at `stop_at` (a killed run)."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.lin, self.seen, self.stop_at = torch.nn.Linear(3 * 8 * 8, 10), [], stop_at

    def training_step(self, batch, _):
        if self.global_step == self.stop_at:
            raise _Stop
        x, y = batch
        self.seen.append(hashlib.md5(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
        return torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_resumed_fit_sees_the_same_batches(tmp_path):
    """A run killed after checkpoints at step 7 (mid-epoch) and 20 (an epoch's end), resumed
    from either, trains on exactly the batches of an uninterrupted run (any worker count)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(workers, name, stop_at=None, ckpt=None):
        cfg = data_cfg(batch_size=64, num_workers=workers, augment=AugmentConfig(scale_min=0.5))
        model = _Recorder(stop_at)
        save = ModelCheckpoint(tmp_path / name, "{step}", every_n_train_steps=1, save_top_k=-1)
        trainer = L.Trainer(
            max_steps=26,
            callbacks=[save] if stop_at else [],
            enable_checkpointing=bool(stop_at),
            use_distributed_sampler=False,  # as vitexp.train: the datamodule shards itself
            limit_val_batches=0,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        killed = pytest.raises(_Stop) if stop_at else contextlib.nullcontext()
        with warnings.catch_warnings(), killed:
            warnings.simplefilter("ignore")
            trainer.fit(model, ImageDataModule(cfg, (8, 8), MEAN0, STD1, seed=3), ckpt_path=ckpt)
        return model.seen

    full = fit(0, "full")  # 20 batches per epoch
    killed = fit(2, "killed", stop_at=22)
    assert killed == full[:22] and len(set(full)) == 26
    for step in (7, 20):
        resumed = fit(2, f"resumed{step}", ckpt=str(tmp_path / "killed" / f"step={step}.ckpt"))
        assert killed[:step] + resumed == full


def test_hf_source_converts_odd_images_and_skips_or_names_corrupt_ones(tmp_path, hf_offline):
    """The same decoding rules through a parquet dataset: greyscale, CMYK, RGBA, 16-bit,
    tiny and big images reach the model as RGB; corrupt bytes are skipped or named."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    good = png_bytes(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG")
    sixteen = Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16))
    images = [
        png_bytes(Image.new("L", (5, 7), 77)),
        png_bytes(Image.new("CMYK", (6, 6), (0, 0, 0, 0)), "JPEG"),
        png_bytes(Image.new("RGBA", (6, 6), (10, 20, 30, 0))),
        png_bytes(sixteen),
        png_bytes(Image.new("RGB", (1, 1), (9, 9, 9))),
        png_bytes(Image.new("RGB", (1200, 900), (0, 90, 0)), "JPEG"),
        good[: len(good) // 2],  # truncated
        b"\x89PNG garbage",  # not an image
    ]
    rows = {
        "image": [{"bytes": b, "path": f"row{i}.png"} for i, b in enumerate(images)],
        "label": [0] * len(images),
    }
    features = Features({"image": HFImage(), "label": ClassLabel(names=["a"])})
    Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "test.parquet"))
    Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    files = {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}
    cfg = dict(source="hf", data_files=files, num_classes=1, batch_size=16, num_workers=0)
    with pytest.warns(UserWarning, match=r"skipping unreadable image row[67]\.png"):
        x, y = next(iter(dm_for(data_cfg(**cfg, on_corrupt="skip")).test_dataloader()))
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.float32  # the 2 corrupt rows dropped
    assert torch.isfinite(x).all() and y.tolist() == [0] * 6
    assert torch.allclose(x[0], torch.tensor(77 / 255), atol=1e-6)  # greyscale -> grey RGB
    assert torch.allclose(x[3], torch.tensor(1.0), atol=1e-6)  # 16-bit white stays white
    with pytest.raises(DataError, match=r"row6\.png: unreadable image .*on_corrupt=skip"):
        next(iter(dm_for(data_cfg(**cfg, on_corrupt="error")).test_dataloader()))
