"""`python -m vitexp.pack`: every layout packs into litdata chunks that read back byte for
byte (labels, class names, splits), chunks mix classes, an interrupted pack finishes on a
re-run exactly as an uninterrupted one, and bad input is one line that writes nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from litdata import StreamingDataset

from data_helpers import png_bytes, solid, write_folder, write_parquet
from vitexp.data import sources
from vitexp.data.config import DataConfig
from vitexp.data.images import ImageDecoder
from vitexp.data.litdata import MANIFEST, STATE_DIR, read_manifest
from vitexp.data.pack import PackCommandConfig, SplitWriter, pack
from vitexp.errors import ConfigError, DataError

CLASSES = {"ant": 14, "bee": 14, "cat": 14}  # 42 solid PNGs, valued 0..41


def run(src, out: Path, **overrides) -> dict:
    kwargs = dict(src=str(src) if isinstance(src, Path) else src, out=str(out))
    kwargs.update(chunk_bytes="600B", progress=False, threads=2)  # ~6 images per chunk
    kwargs.update(overrides)
    return pack(PackCommandConfig(**kwargs))


def rows(out: Path, split: str) -> list[tuple[bytes, int, int, str]]:
    """Every row of a packed split, in pack order, read with litdata itself."""
    ds = StreamingDataset(str(out / split))
    return [(bytes(d), int(y), int(k), str(n)) for d, y, k, n in (ds[i] for i in range(len(ds)))]


def chunk_labels(out: Path, split: str) -> list[list[int]]:
    index = json.loads((out / split / "index.json").read_text())
    sizes = [c["chunk_size"] for c in index["chunks"]]
    labels = [y for _, y, _, _ in rows(out, split)]
    starts = np.cumsum([0, *sizes])
    return [labels[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_flat_folder_packs_byte_for_byte_with_the_imagefolder_splits(tmp_path):
    src, out = tmp_path / "src", tmp_path / "pack"
    write_folder(src, CLASSES)
    manifest = run(src, out)
    assert manifest["class_names"] == ["ant", "bee", "cat"]
    # the splits data=imagefolder holds out of the same folder, with the same seed
    folder = sources.load_imagefolder(
        DataConfig(source="imagefolder", root=str(src)), ImageDecoder()
    )
    for split in ("train", "val", "test"):
        packed = rows(out, split)
        names = sorted(name for _, _, _, name in packed)
        assert [k for _, _, k, _ in packed] == list(range(len(packed)))
        for data, label, _, name in packed:
            assert data == (src / name).read_bytes()  # the file's bytes, not re-encoded
            assert manifest["class_names"][label] == name.split("/")[0]
        labels = np.load(out / split / "labels.npy")
        assert labels.tolist() == [y for _, y, _, _ in packed]
        info = manifest["splits"][split]
        assert info["images"] == len(packed) == len(getattr(folder, split))
        assert info["class_counts"] == np.bincount(labels, minlength=3).tolist()
        assert names == sorted(_names(getattr(folder, split), src))
    assert manifest["splits"]["test"]["from"].startswith("held out: 0.2")
    chunks = chunk_labels(out, "train")
    full = [c for c in chunks if len(c) >= 4]  # (the last chunk may hold one or two)
    assert len(full) >= 4 and all(len(set(c)) > 1 for c in full)  # in folder order: one each
    assert not (out / STATE_DIR).exists()


def _names(split, root: Path) -> list[str]:
    """Relative paths of the files of a (SubsetSplit of a) FileSplit."""
    from vitexp.data.pack_sources import _files

    return [str(Path(p).relative_to(root)) for p in _files(split)[0]]


@pytest.mark.timeout(120)  # the failure it guards against is a hang
def test_a_pack_run_inside_a_distributed_job_writes_as_one_process(tmp_path, monkeypatch):
    """WORLD_SIZE / GLOBAL_RANK of the job it runs in (litdata's writer reads them) change
    nothing: the writer would otherwise wait forever for the other ranks' indexes."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("GLOBAL_RANK", "1")
    write_folder(tmp_path / "src", {"a": 5, "b": 5})
    run(tmp_path / "src", tmp_path / "pack")
    names = sorted(p.name for p in (tmp_path / "pack" / "train").iterdir())
    assert names[0].startswith("chunk-0-") and "index.json" in names


def test_split_folders_keep_their_splits(tmp_path):
    src, out = tmp_path / "src", tmp_path / "pack"
    write_folder(src / "train", {"a": 8, "b": 8})
    write_folder(src / "val", {"a": 2, "b": 3}, start=100)
    write_folder(src / "test", {"a": 4, "b": 1}, start=200)
    manifest = run(src, out)
    got = {s: sorted(n for _, _, _, n in rows(out, s)) for s in ("train", "val", "test")}
    assert got["val"] == ["val/a/0.png", "val/a/1.png", "val/b/0.png", "val/b/1.png", "val/b/2.png"]
    assert [manifest["splits"][s]["images"] for s in ("train", "val", "test")] == [16, 5, 5]
    assert manifest["splits"]["val"]["from"] == "val/"
    assert manifest["splits"]["test"]["class_counts"] == [4, 1]
    for split, names in got.items():
        for data, _, _, name in rows(out, split):
            assert data == (src / name).read_bytes()
        assert len(names) == len(set(names))


def _parquet_bytes(files) -> dict[str, bytes]:
    """file:row -> the image bytes stored in the parquet files."""
    found = {}
    for f in files:
        column = pq.read_table(f, columns=["image"]).column(0).to_pylist()
        found |= {f"{Path(f).name}:{i}": v["bytes"] for i, v in enumerate(column)}
    return found


def test_parquet_shards_named_by_split_keep_their_class_names_and_bytes(tmp_path):
    src, out = tmp_path / "src", tmp_path / "pack"
    src.mkdir()
    write_parquet(src / "train-00000-of-00002.parquet", range(0, 20))
    write_parquet(src / "train-00001-of-00002.parquet", range(20, 44))
    write_parquet(src / "validation-00000-of-00001.parquet", range(100, 110))
    manifest = run(src, out)
    assert manifest["class_names"] == ["a", "b", "c"]  # the ClassLabel in the schema
    assert manifest["splits"]["test"]["images"] == 10  # validation is the test split
    assert manifest["splits"]["test"]["from"].startswith("the source's validation files")
    assert manifest["splits"]["train"]["images"] + manifest["splits"]["val"]["images"] == 44
    stored = _parquet_bytes(sorted(src.glob("*.parquet")))
    seen = []
    for split in ("train", "val", "test"):
        for data, label, _, name in rows(out, split):
            assert data == stored[name]
            idx = int(pq.read_table(src / name.split(":")[0])["idx"][int(name.split(":")[1])])
            assert label == idx % 3
            seen.append(name)
    assert sorted(seen) == sorted(stored)


def test_a_parquet_glob_with_integer_labels_is_one_pool(tmp_path):
    src, out = tmp_path / "src", tmp_path / "pack"
    src.mkdir()
    for i, ids in enumerate((range(0, 25), range(25, 50))):
        write_parquet(src / f"part{i}.parquet", ids, labels=[j % 4 for j in ids], names="abcd")
    manifest = run(str(src / "part*.parquet"), out, test_fraction=0.2, val_fraction=0.1)
    assert manifest["class_names"] == ["0", "1", "2", "3"]
    assert [manifest["splits"][s]["images"] for s in ("train", "val", "test")] == [36, 4, 10]
    # stratified: 13, 13, 12, 12 images per class -> 2.6, 2.6, 2.4, 2.4 -> 3, 3, 2, 2
    assert manifest["splits"]["test"]["class_counts"] == [3, 3, 2, 2]


def test_a_saved_hugging_face_dataset(tmp_path, hf_offline):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage

    features = Features({"img": HFImage(), "y": ClassLabel(names=["no", "yes"])})
    images = [png_bytes(solid(i, (5, 5))) for i in range(30)]

    def part(ids):
        data = {"img": [{"bytes": images[i], "path": None} for i in ids], "y": [i % 2 for i in ids]}
        return Dataset.from_dict(data, features=features)

    DatasetDict(train=part(range(24)), test=part(range(24, 30))).save_to_disk(tmp_path / "hf")
    out = tmp_path / "pack"
    manifest = run(tmp_path / "hf", out, image_column="img", label_column="y")
    assert manifest["class_names"] == ["no", "yes"] and manifest["source"] == "hf"
    assert manifest["splits"]["test"]["images"] == 6
    for split in ("train", "val", "test"):
        for data, label, _, name in rows(out, split):
            i = int(name.split("[")[1].rstrip("]")) + (24 if name.startswith("test") else 0)
            assert data == images[i] and label == i % 2


def test_hf_names_load_offline_or_say_they_are_not_cached(tmp_path, hf_offline):
    """src=hf:NAME goes through datasets.load_dataset with the hub switched off (a local
    folder of parquet files stands in for a cached hub dataset here)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    write_parquet(repo / "train-0.parquet", range(0, 20))
    write_parquet(repo / "test-0.parquet", range(20, 26))
    manifest = run(f"hf:{repo}", tmp_path / "pack")
    assert manifest["source"] == "hf" and manifest["class_names"] == ["a", "b", "c"]
    assert manifest["splits"]["test"]["images"] == 6
    with pytest.raises(DataError, match=r"src=hf:nobody/nothing is not in the local Hugging"):
        run("hf:nobody/nothing", tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_an_interrupted_pack_finishes_on_a_rerun_as_if_never_stopped(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    write_folder(src, CLASSES)
    whole = run(src, tmp_path / "whole")
    cut = tmp_path / "cut"
    added = []
    add = SplitWriter.add

    def killed_after_25_rows(self, k, item):
        if len(added) == 25:
            raise KeyboardInterrupt  # nothing of the pack runs after it, as after a kill
        added.append(k)
        add(self, k, item)

    monkeypatch.setattr(SplitWriter, "add", killed_after_25_rows)
    with pytest.raises(KeyboardInterrupt):
        run(src, cut)
    monkeypatch.undo()
    assert not (cut / MANIFEST).exists()
    with pytest.raises(DataError, match="a pack that did not finish.*re-run the same"):
        read_manifest(cut)
    saved = json.loads((cut / STATE_DIR / "train" / "checkpoint-0.json").read_text())
    assert 0 < saved["samples_written"] < whole["splits"]["train"]["images"]
    # the chunk being written when it stopped
    (cut / "train" / f"chunk-0-{saved['next_chunk_index']}.bin").write_bytes(b"half a chunk")
    before = snapshot(cut)
    with pytest.raises(DataError, match=r"unfinished pack started with other arguments \(.*seed=0"):
        run(src, cut, seed=1)
    assert snapshot(cut) == before  # refused: nothing touched
    capsys.readouterr()
    resumed = run(src, cut)
    assert "continuing the pack" in capsys.readouterr().out
    assert {k: v for k, v in resumed.items() if k != "made"} == {
        k: v for k, v in whole.items() if k != "made"
    }
    for split in ("train", "val", "test"):
        a, b = tmp_path / "whole" / split, cut / split
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for f in a.iterdir():
            if f.name == "index.json":
                ia, ib = (json.loads(p.read_text()) for p in (f, b / f.name))
                assert ia["chunks"] == ib["chunks"] and ia["config"] == ib["config"]
            else:
                assert f.read_bytes() == (b / f.name).read_bytes(), f.name


def test_a_complete_pack_is_kept_and_another_refused(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "pack"
    write_folder(src, {"a": 6, "b": 6})
    run(src, out)
    before = snapshot(out)
    capsys.readouterr()
    run(src, out, threads=1)  # threads do not change the content
    assert "already holds this pack" in capsys.readouterr().out
    other = tmp_path / "other"
    write_folder(other, {"x": 6, "y": 6})
    with pytest.raises(DataError) as err:
        run(other, out)
    assert "already holds a complete pack of other data" in str(err.value)
    assert "\n" not in str(err.value)
    assert snapshot(out) == before


def _write_bad(tmp_path: Path, case: str):
    src = tmp_path / "src"
    if case == "missing":
        return src, "does not exist"
    if case == "loose images":
        src.mkdir()
        solid(3).save(src / "x.png")
        return src, "none of the layouts vitexp.pack reads: an image folder"
    if case == "text file":
        src.mkdir()
        (src / "notes.txt").write_text("hi")
        return src / "notes.txt", "none of the layouts"
    if case == "empty class":
        write_folder(src, {"a": 3})
        (src / "b").mkdir()
        return src, r"src: .*/b has no images"
    if case == "glob matching nothing":
        return str(tmp_path / "*.parquet"), "matches no file"
    src.mkdir()
    if case == "mixed parquet names":
        write_parquet(src / "train-0.parquet", range(4))
        write_parquet(src / "extra.parquet", range(4, 8))
        return src, "extra.parquet is not named after a split"
    if case == "no image column":
        write_parquet(src / "train-0.parquet", range(4))
        return src, "image_column='pixels' is not a column of train-0.parquet"
    if case == "unlabelled split":
        write_parquet(src / "train-0.parquet", range(6), labels=[0, 1, 2, 0, 1, 2])
        write_parquet(src / "test-0.parquet", range(6, 9), labels=[-1, -1, -1])
        return src, r"the test split has unlabelled rows \(label -1\).*splits=\[train"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "loose images",
        "text file",
        "empty class",
        "glob matching nothing",
        "mixed parquet names",
        "no image column",
        "unlabelled split",
    ],
)
def test_a_source_of_no_supported_layout_is_one_line_and_writes_nothing(tmp_path, case):
    src, pattern = _write_bad(tmp_path, case)
    out = tmp_path / "pack"
    extra = {"image_column": "pixels"} if case == "no image column" else {}
    with pytest.raises(DataError) as err:
        run(src, out, **extra)
    assert "\n" not in str(err.value)
    assert re.search(pattern, str(err.value)), str(err.value)
    assert not out.exists()


def test_unlabelled_splits_can_be_left_out(tmp_path):
    src, pattern = _write_bad(tmp_path, "unlabelled split")
    manifest = run(src, tmp_path / "pack", splits=["train"], val_fraction=0.2, test_fraction=0.4)
    assert [manifest["splits"][s]["images"] for s in ("train", "val", "test")] == [3, 1, 2]


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"src": None}, "src is not set"),
        ({"out": None}, "out is not set"),
        ({"chunk_bytes": "lots"}, "chunk_bytes='lots' is not a size"),
        ({"val_fraction": 1.5}, r"val_fraction=1.5 must be in \[0, 1\)"),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path, overrides, pattern):
    kwargs = {"src": str(tmp_path), "out": str(tmp_path / "pack"), **overrides}
    with pytest.raises(ConfigError, match=pattern):
        pack(PackCommandConfig(**kwargs))
    assert not (tmp_path / "pack").exists()


def test_out_that_holds_something_else_is_refused(tmp_path):
    src = tmp_path / "src"
    write_folder(src, {"a": 4, "b": 4})
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("mine")
    with pytest.raises(DataError, match="is not empty and holds no vitexp pack"):
        run(src, busy)
    assert [p.name for p in busy.iterdir()] == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        run(src, tmp_path / "file")


def test_the_command_line_exits_2_with_one_line(tmp_path):
    out = tmp_path / "pack"
    done = subprocess.run(
        [sys.executable, "-m", "vitexp.pack", f"src={tmp_path / 'nowhere'}", f"out={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: src={tmp_path / 'nowhere'} does not exist; point it at an image folder "
        "(SRC/<class>/<image> or SRC/{train,val,test}/<class>/<image>), parquet files "
        "(SRC/*.parquet, SRC/data/*.parquet, a file or a glob), a Hugging Face dataset saved "
        "with save_to_disk, or hf:NAME from the local Hugging Face cache"
    ]
    assert not out.exists()
