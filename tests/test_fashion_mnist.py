"""data=fashion_mnist: the official idx files, found where Debian's package, data.root,
$VITEXP_DATA or torchvision put them, checked, split 55,000 / 5,000 / 10,000."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import data_cfg
from vitexp.data import ImageDataModule, fashion_mnist
from vitexp.errors import DataError

HAVE_DEBIAN = fashion_mnist.has_files(fashion_mnist.DEBIAN)
MEAN0, STD1 = [0.0] * 3, [1.0] * 3


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake(folder: Path) -> None:
    """The four files with the official counts: image i is filled with i % 251, label i % 10."""
    for split, (images, labels, n) in fashion_mnist.FILES.items():
        ids = np.arange(n) + (0 if split == "train" else 100_000)
        pixels = np.broadcast_to((ids % 251).astype(np.uint8)[:, None, None], (n, 28, 28))
        write_idx(folder / images, pixels, 2051)
        write_idx(folder / labels, ids % 10, 2049)


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    write_fake(root)
    return root


@pytest.fixture
def nowhere(monkeypatch, tmp_path):
    """Neither Debian's folder nor $VITEXP_DATA hold the files."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN", tmp_path / "no-debian")
    monkeypatch.delenv("VITEXP_DATA", raising=False)


def module(**overrides) -> ImageDataModule:
    cfg = data_cfg(source="fashion_mnist", val_fraction=5000 / 60000, **overrides)
    dm = ImageDataModule(cfg, (28, 28), MEAN0, STD1, seed=0)
    dm.setup("fit")
    return dm


def test_splits_class_names_and_pixels_from_data_root(fake, nowhere):
    dm = module(root=str(fake))
    assert dm.class_names[0] == "T-shirt/top" and dm.class_names[9] == "Ankle boot"
    train, val, test = (dm.raw_split(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (55_000, 5_000, 10_000)
    # stratified: every class keeps its tenth of the held-out 5,000
    assert np.bincount(val.labels).tolist() == [500] * 10
    image, label = test[7]  # official test image 7: filled with (100007 % 251)
    assert image.mode == "RGB" and image.size == (28, 28) and label == 100_007 % 10
    assert np.asarray(image)[0, 0].tolist() == [100_007 % 251] * 3
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 28, 28) and torch.equal(y, torch.arange(4))


def test_found_in_vitexp_data_and_in_torchvisions_layout(fake, nowhere, monkeypatch, tmp_path):
    data = tmp_path / "data"
    (data / "fashion-mnist" / "FashionMNIST").mkdir(parents=True)
    (data / "fashion-mnist" / "FashionMNIST" / "raw").symlink_to(fake)
    monkeypatch.setenv("VITEXP_DATA", str(data))
    assert fashion_mnist.find(data_cfg(source="fashion_mnist")) == (
        data / "fashion-mnist" / "FashionMNIST" / "raw"
    )


def test_missing_everywhere_names_both_ways_to_get_it(nowhere, tmp_path):
    with pytest.raises(DataError) as err:
        module(root=str(tmp_path / "empty"))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "empty") in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.download=true" in message


def test_truncated_corrupt_and_foreign_files_are_one_line_naming_the_file(fake, nowhere, tmp_path):
    images = "t10k-images-idx3-ubyte.gz"
    cases = {
        "truncated": (lambda p: write_idx(p, np.zeros((10_000, 28, 27)), 2051), "expected"),
        "short body": (
            lambda p: p.write_bytes(gzip.compress(p_header(10_000) + b"x" * 99)),
            "truncated",
        ),
        "not gzip": (lambda p: p.write_bytes(b"not a gzip file at all"), "not a readable gzip"),
        "labels as images": (
            lambda p: write_idx(p, np.zeros(10_000), 2049),
            "not the expected idx",
        ),
    }
    for name, (damage, says) in cases.items():
        root = tmp_path / name.replace(" ", "_")
        root.mkdir()
        for f in fake.iterdir():
            (root / f.name).symlink_to(f)
        (root / images).unlink()
        damage(root / images)
        with pytest.raises(DataError) as err:
            module(root=str(root))
        assert "\n" not in str(err.value) and says in str(err.value), name
        assert str(root / images) in str(err.value) and "fetch it again" in str(err.value)


def p_header(n: int) -> bytes:
    return np.array([2051, n, 28, 28], dtype=">u4").tobytes()


@pytest.mark.skipif(not HAVE_DEBIAN, reason="apt-get install dataset-fashion-mnist (.ci/run does)")
def test_the_real_files_from_debians_package():
    dm = module()  # data.root unset: Debian's folder
    test = dm.raw_split("test")
    assert dm.cfg.root is None and len(test) == 10_000
    # the official order: the first test image is an ankle boot, the second a pullover
    assert [test[i][1] for i in range(3)] == [9, 2, 1]
    assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    pixels = np.asarray(test[0][0])
    assert pixels.std() > 30 and pixels[0, 0].tolist() == [0, 0, 0]  # a photo on black


def test_data_classes_keeps_some_classes_relabelled_in_the_order_given(fake, nowhere):
    dm = module(root=str(fake), classes=["Shirt", "Sneaker", 8, "Ankle boot"])
    assert dm.class_names == ["Shirt", "Sneaker", "Bag", "Ankle boot"] and dm.num_classes == 4
    test = dm.raw_split("test")
    assert len(test) == 4_000 and np.bincount(test.labels).tolist() == [1000] * 4
    image, label = test[0]  # the first kept test image: official index 6, a shirt (6 -> 0)
    assert label == 0 and np.asarray(image)[0, 0, 0] == 100_006 % 251
    assert len(dm.raw_split("train")) + len(dm.raw_split("val")) == 24_000
    x, y = next(iter(dm.train_dataloader()))
    assert y.max() < 4
    with pytest.raises(DataError, match=r"data.classes: 'Hat' is not a class of data.root=.*"):
        module(root=str(fake), classes=["Shirt", "Hat"])
    with pytest.raises(DataError, match=r"names a class twice"):
        module(root=str(fake), classes=["Shirt", 6])


def test_a_run_is_placed_between_the_published_numbers():
    from vitexp.analysis.baselines import beside_published

    line = beside_published(0.9001, "fashion_mnist")
    assert line == (
        "fashion_mnist test accuracy 0.9001: above RBF SVC, C=10 (sklearn benchmark) 0.897, "
        "below 2 conv + pooling (TensorFlow tutorial) 0.916 (published)"
    )
    assert "above WRN40-4" in beside_published(0.99, "fashion_mnist")
    assert beside_published(0.5, "fashion_mnist").endswith(
        "below human (crowd, no fashion expertise) 0.835 (published)"
    )
    assert beside_published(0.9, "digits") is None


def test_the_baselines_command_fits_and_names_a_bad_override_in_one_line():
    import subprocess
    import sys

    run = [sys.executable, "-m", "vitexp.baselines"]
    bad = subprocess.run([*run, "data=nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "data=nope is not a known option" in bad.stderr
    ok = subprocess.run([*run, "data=digits"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "logistic regression" in ok.stdout and "(here)" in ok.stdout


@pytest.mark.skipif(not HAVE_DEBIAN, reason="apt-get install dataset-fashion-mnist (.ci/run does)")
def test_reproduce_measures_the_real_models_attention_on_fashion_images(tmp_path: Path):
    from PIL import Image

    from vitexp.reproduce import fashion_test_images

    folder = fashion_test_images(tmp_path / "images")
    files = sorted(folder.iterdir())
    assert len(files) == 10  # one test image of each class
    assert {f.name.rsplit("_", 1)[0] for f in files} >= {"Ankle boot", "T-shirt_top", "Bag"}
    image = Image.open(files[0])
    assert image.size == (28, 28) and image.mode == "RGB"
