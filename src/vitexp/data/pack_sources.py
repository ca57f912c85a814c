"""What `vitexp.pack` reads: an image folder, parquet files or a Hugging Face dataset, as a
`Pool` of rows whose labels and splits are known before any image is read.

Rows are numbered unit by unit; a unit is what one read returns: an image file, a parquet
row group, a row of a Hugging Face dataset. Image bytes are returned exactly as stored (a
JPEG stays that JPEG). Splits follow `vitexp.data.sources`: a source's own val/test are
kept; with only one of them, it is the test split (the ImageNet convention); what is
missing is held out of train by the same stratified, seeded fractions as `data.seed`,
`data.val_fraction` and `data.test_fraction` (`sources.holdout`), so that packing a flat
image folder gives the splits that `data=imagefolder` gives it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitexp.data import sources
from vitexp.data.config import DataConfig
from vitexp.data.images import ImageDecoder
from vitexp.errors import DataError

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {  # a source's split name -> the pack's
    "train": "train",
    "validation": "val",
    "val": "val",
    "valid": "val",
    "dev": "val",
    "test": "test",
}
LAYOUTS = (
    "an image folder (SRC/<class>/<image> or SRC/{train,val,test}/<class>/<image>), parquet "
    "files (SRC/*.parquet, SRC/data/*.parquet, a file or a glob), a Hugging Face dataset "
    "saved with save_to_disk, or hf:NAME from the local Hugging Face cache"
)


@dataclass
class Pool:
    """Rows to pack. `read_unit(u)` returns unit u's rows as (image bytes, name)."""

    kind: str  # imagefolder | parquet | hf
    class_names: list[str]
    labels: np.ndarray  # int64 per row
    split: np.ndarray  # int8 per row: index into SPLITS
    unit_rows: np.ndarray  # int64 rows per unit
    read_unit: Callable[[int], list[tuple[bytes, str]]]
    identity: str  # a digest of what was listed: unit names, sizes, labels, splits
    origins: dict[str, str] = field(default_factory=dict)  # split -> where it came from
    notes: list[str] = field(default_factory=list)  # said once the pack is done

    @property
    def random_access(self) -> bool:
        """Every unit one row: any order costs the same to read."""
        return bool((self.unit_rows == 1).all())


@dataclass
class Options:
    """The `vitexp.pack` settings a source needs."""

    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    image_column: str = "image"
    label_column: str = "label"
    splits: Sequence[str] | None = None  # the source's splits to pack (None: all known ones)


def open_source(src: Any, opt: Options) -> Pool:
    """The Pool of `src=`, or one DataError naming what is wrong with it."""
    items = [str(s) for s in src] if isinstance(src, (list, tuple)) else [str(src)]
    if len(items) == 1 and items[0].startswith("hf:"):
        return _hf_pool(_hf_hub(items[0][3:]), items[0], opt)
    files = _parquet_files(items)
    if files is not None:
        return _parquet_pool(files, opt)
    if len(items) > 1:
        raise DataError(f"src={items}: a list must name parquet files or globs; {LAYOUTS}")
    path = Path(items[0]).expanduser()
    if not path.exists():
        raise DataError(f"src={path} does not exist; point it at {LAYOUTS}")
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        return _hf_pool(_hf_disk(path), str(path), opt)
    if path.is_dir() and any(e.is_dir() and e.name[0] != "." for e in path.iterdir()):
        return _folder_pool(path, opt)
    raise DataError(f"src={path} is none of the layouts vitexp.pack reads: {LAYOUTS}")


def digest(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def held_out(labels: np.ndarray, opt: Options, need_val: bool, need_test: bool) -> np.ndarray:
    """Split ids (0 train, 1 val, 2 test) of a train pool, holding out what is missing:
    test = test_fraction of all, then val = val_fraction of the rest (as sources._fractions)."""
    split = np.zeros(len(labels), dtype=np.int8)
    keep = np.arange(len(labels))
    seed = opt.seed % 2**64
    if need_test:
        kept, held = sources.holdout(labels, opt.test_fraction, [seed, 1])
        split[keep[held]], keep = 2, keep[kept]
    if need_val:
        kept, held = sources.holdout(labels[keep], opt.val_fraction, [seed, 2])
        split[keep[held]] = 1
    return split


def _fraction_note(opt: Options, key: str) -> str:
    if key == "test":
        return f"held out: {opt.test_fraction:g} of the train images (stratified, seed {opt.seed})"
    return (
        f"held out: {opt.val_fraction:g} of the train images left after the test holdout "
        f"(stratified, seed {opt.seed})"
    )


# --- image folders ---------------------------------------------------------------------------
def _folder_pool(root: Path, opt: Options) -> Pool:
    """The files and splits that `data=imagefolder data.root=root` reads."""
    cfg = DataConfig(
        source="imagefolder",
        root=str(root),
        seed=opt.seed,
        val_fraction=opt.val_fraction,
        test_fraction=opt.test_fraction,
    )
    try:
        splits = sources.load_imagefolder(cfg, ImageDecoder())
    except DataError as err:  # its messages name data.root: here that is src=
        raise DataError(str(err).replace("data.root", "src")) from None
    paths: list[str] = []
    labels, split = [], []
    for i, name in enumerate(SPLITS):
        p, y = _files(getattr(splits, name))
        paths += p
        labels.append(y)
        split.append(np.full(len(y), i, dtype=np.int8))
    names = [str(Path(p).relative_to(root)) for p in paths]
    origins = _folder_origins(root, opt)
    labels_all, split_all = np.concatenate(labels), np.concatenate(split)

    def read(u: int) -> list[tuple[bytes, str]]:
        return [(_read_file(paths[u], names[u]), names[u])]

    return Pool(
        kind="imagefolder",
        class_names=list(splits.class_names),
        labels=labels_all,
        split=split_all,
        unit_rows=np.ones(len(paths), dtype=np.int64),
        read_unit=read,
        identity=digest(names, labels_all, split_all),
        origins=origins,
    )


def _folder_origins(root: Path, opt: Options) -> dict[str, str]:
    """Where each split of an image folder came from (sources.load_imagefolder's rules)."""
    if not (root / "train").is_dir():
        return {"train": "all images", **{k: _fraction_note(opt, k) for k in ("val", "test")}}
    has_val, has_test = (root / "val").is_dir(), (root / "test").is_dir()
    origins = {"train": "train/", "val": _fraction_note(opt, "val")}
    if has_test:
        origins["test"] = "test/"
        if has_val:
            origins["val"] = "val/"
    elif has_val:
        origins["test"] = "val/ (there is no test/: val/ is the test split, as ImageNet's)"
    else:
        origins["test"] = _fraction_note(opt, "test")
    return origins


def _files(ds: Any) -> tuple[list[str], np.ndarray]:
    """The paths and labels of a FileSplit, or of a SubsetSplit of one."""
    if isinstance(ds, sources.SubsetSplit):
        paths, labels = _files(ds.base)
        return [paths[i] for i in ds.indices], labels[ds.indices]
    return list(ds.paths), np.asarray(ds.labels, dtype=np.int64)


def _read_file(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise DataError(
            f"src: {name} could not be read ({err.strerror or type(err).__name__}); fix its "
            "permissions or remove it, then re-run the same command: it continues"
        ) from None


# --- parquet -----------------------------------------------------------------------------------
def _parquet_files(items: list[str]) -> list[Path] | None:
    """The parquet files `src=` names (a file, a glob, a list, a folder of them, or its
    data/ subfolder, as a Hugging Face repository has); None when it names none."""
    files: set[Path] = set()
    for item in items:
        path = Path(item).expanduser()
        if glob.has_magic(item):
            found = [Path(p) for p in glob.glob(str(path))]
            if not found:
                raise DataError(f"src={item} matches no file; check the pattern")
            files |= set(found)
        elif path.is_file() and path.suffix == ".parquet":
            files.add(path)
        elif path.is_dir():
            found = sorted(path.glob("*.parquet")) or sorted(path.glob("data/*.parquet"))
            if not found:
                return None
            files |= set(found)
        else:
            return None
    if any(p.suffix != ".parquet" for p in files):
        odd = sorted(str(p) for p in files if p.suffix != ".parquet")
        raise DataError(f"src: {odd[0]} is not a .parquet file; {LAYOUTS}")
    return sorted(files)


_SPLIT_PREFIX = re.compile(r"^(train|validation|valid|val|dev|test)(?![a-z])", re.I)


def _parquet_split(path: Path) -> str | None:
    found = _SPLIT_PREFIX.match(path.name)
    return SPLIT_NAMES[found.group(1).lower()] if found else None


def _parquet_pool(files: list[Path], opt: Options) -> Pool:
    """Parquet files: split by their names (train-*, validation-*, test-*, as Hugging Face
    writes them) when every file has one, else one pool held out by fractions. Labels:
    the ClassLabel names that `datasets` keeps in the schema, else the integers or strings."""
    import pyarrow.parquet as pq

    named = [_parquet_split(f) for f in files]
    if any(named) and not all(named):
        odd = next(f for f, s in zip(files, named, strict=True) if s is None)
        raise DataError(
            f"src: {odd.name} is not named after a split (train-*, validation-*, test-*) as "
            "the other files are; give src= the files of one kind"
        )
    kept = [(f, s) for f, s in zip(files, named, strict=True) if _wanted(s, opt)]
    if not kept:
        raise DataError(f"src: splits={list(opt.splits or [])} leaves no parquet file to pack")
    units: list[tuple[Path, int, int]] = []  # (file, row group, its first row in the file)
    unit_rows, labels, label_split, names_seen = [], [], [], []
    for path, split in kept:
        try:
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(
                f"src: {path} is not a readable parquet file ({err}); remove it"
            ) from None
        for key in ("image_column", "label_column"):
            column = getattr(opt, key)
            if column not in schema.names:
                raise DataError(
                    f"{key}={column!r} is not a column of {path.name} (columns: "
                    f"{', '.join(schema.names)}); set {key}"
                )
        names_seen.append(_classlabel_names(schema, opt.label_column))
        values = pf.read(columns=[opt.label_column]).column(0).to_pylist()
        labels.append(values)
        label_split.append((split or "train", len(values)))
        meta, first = pf.metadata, 0
        for g in range(meta.num_row_groups):
            units.append((path, g, first))
            unit_rows.append(meta.row_group(g).num_rows)
            first += unit_rows[-1]
    names = names_seen[0]
    if any(n != names for n in names_seen):
        raise DataError("src: the parquet files' label columns have different class names")
    flat = [v for vs in labels for v in vs]
    where = [s for s, n in label_split for _ in range(n)]
    class_names, y = _label_ids(flat, names, where)
    pack_split = np.array([SPLITS.index(s) for s in where], dtype=np.int8)
    present = {s for _, s in kept if s} or {"train"}
    pack_split, origins = _assign(pack_split, y, present, opt, "files")
    col = opt.image_column

    def read(u: int) -> list[tuple[bytes, str]]:
        path, group, start = units[u]
        values = pq.ParquetFile(path).read_row_group(group, columns=[col]).column(0).to_pylist()
        return [
            _image_bytes(v, f"{path.name}:{start + i}", path.parent) for i, v in enumerate(values)
        ]

    rows = np.asarray(unit_rows, dtype=np.int64)
    unit_names = [f"{p}:{g}" for p, g, _ in units]
    return Pool(
        kind="parquet",
        class_names=class_names,
        labels=y,
        split=pack_split,
        unit_rows=rows,
        read_unit=read,
        identity=digest(unit_names, rows, y, pack_split, [f.stat().st_size for f, _ in kept]),
        origins=origins,
    )


def _classlabel_names(schema: Any, column: str) -> list[str] | None:
    """The ClassLabel names that `datasets` stores in a parquet schema, if any."""
    if not schema.metadata or b"huggingface" not in schema.metadata:
        return None
    from datasets import ClassLabel, Features

    with contextlib.suppress(Exception):  # metadata of another datasets version: plain labels
        feature = Features.from_arrow_schema(schema).get(column)
        if isinstance(feature, ClassLabel):
            return list(feature.names)
    return None


def _image_bytes(value: Any, name: str, base: Path | None) -> tuple[bytes, str]:
    """A row's image as stored: bytes, or `datasets`' {"bytes", "path"} (a path alone is
    read from disk, relative to the data's folder)."""
    path = None
    if isinstance(value, dict):
        path = value.get("path")
        value = value.get("bytes")
        if path:
            name = f"{name} ({path})"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), name
    if path:
        file = Path(path) if Path(path).is_absolute() or base is None else base / path
        if file.is_file():
            return file.read_bytes(), name
    raise DataError(
        f"src: {name} holds no image bytes (a {type(value).__name__}"
        + (f", and its path {path} is not a file" if path else "")
        + "); set image_column to the column of encoded images"
    )


def _wanted(split: str | None, opt: Options) -> bool:
    if opt.splits is None or split is None:
        return True
    return split in {SPLIT_NAMES.get(s.lower(), s.lower()) for s in opt.splits}


def _label_ids(values: list[Any], names: list[str] | None, where: list[str]):
    """(class names, int64 ids): ClassLabel names keep their ids; integers are their own
    ids ("0".."max"); strings are sorted. Missing and negative (unlabelled) labels are refused."""
    for value, split in zip(values, where, strict=True):
        if value is None or (isinstance(value, (int, np.integer)) and value < 0):
            raise DataError(
                f"src: the {split} split has unlabelled rows (label {value}); leave that "
                "split out (splits=[train,validation], or src= the labelled files only)"
            )
    if names is not None:
        if max(values) >= len(names):
            raise DataError(f"src: label {max(values)} is outside the {len(names)} class names")
        return names, np.asarray(values, dtype=np.int64)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(int(max(values)) + 1)], np.asarray(values, dtype=np.int64)
    names = sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    return names, np.array([index[str(v)] for v in values], dtype=np.int64)


def _assign(split: np.ndarray, labels: np.ndarray, present: set[str], opt: Options, noun: str):
    """The pack's splits from the source's (`split`: the source's split of each row) and
    where each came from; missing ones held out of train."""
    if "train" not in present:
        raise DataError(
            f"src has no train split (it has {', '.join(sorted(present))}); name the train "
            "files train-*.parquet, or give src= a train split"
        )
    has_val, has_test = "val" in present, "test" in present
    origins = {"train": f"the source's train {noun}"}
    if has_val and not has_test:  # the ImageNet convention: the official val is the test set
        split = np.where(split == 1, 2, split).astype(np.int8)
        origins["test"] = f"the source's validation {noun} (no test split: this is the test split)"
        has_test, has_val = True, False
    elif has_test:
        origins["test"] = f"the source's test {noun}"
    if has_val:
        origins["val"] = f"the source's validation {noun}"
    train = np.flatnonzero(split == 0)
    sub = held_out(labels[train], opt, need_val=not has_val, need_test=not has_test)
    split[train] = sub
    for key in ("val", "test"):
        origins.setdefault(key, _fraction_note(opt, key))
    return split, origins


# --- Hugging Face datasets -------------------------------------------------------------------
def _hf_disk(path: Path) -> Any:
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - datasets raises many types
        raise DataError(f"src={path}: a saved dataset that does not load ({err})") from None


def _hf_hub(name: str) -> Any:
    """A hub dataset from the local cache only: packing never downloads."""
    import datasets.config as dconfig
    import huggingface_hub.constants as hconst
    from datasets import load_dataset

    saved = dconfig.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE
    dconfig.HF_HUB_OFFLINE = hconst.HF_HUB_OFFLINE = True
    try:
        return load_dataset(name)
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"src=hf:{name} is not in the local Hugging Face cache ({first}); download it "
            "first (datasets.load_dataset), or give src= its files"
        ) from None
    finally:
        dconfig.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE = saved


def _hf_pool(loaded: Any, where: str, opt: Options) -> Pool:
    from datasets import ClassLabel
    from datasets import Image as HFImage

    parts = dict(loaded) if hasattr(loaded, "keys") else {"train": loaded}
    unknown = sorted(k for k in parts if k.lower() not in SPLIT_NAMES)
    known = {k: v for k, v in parts.items() if k.lower() in SPLIT_NAMES}
    known = {k: v for k, v in known.items() if _wanted(SPLIT_NAMES[k.lower()], opt)}
    notes = [f"ignored splits of {where}: {', '.join(unknown)}"] if unknown else []
    if not known:
        raise DataError(f"src={where} has no train, validation or test split to pack")
    datasets, labels, where_split, names = [], [], [], None
    for key, ds in known.items():
        features = ds.features or {}
        for opt_key in ("image_column", "label_column"):
            column = getattr(opt, opt_key)
            if column not in features:
                raise DataError(
                    f"{opt_key}={column!r} is not a column of {where}[{key}] (columns: "
                    f"{', '.join(features)}); set {opt_key}"
                )
        if isinstance(features[opt.image_column], HFImage):
            ds = ds.cast_column(opt.image_column, HFImage(decode=False))
        feature = features[opt.label_column]
        if isinstance(feature, ClassLabel):
            names = list(feature.names)
        values = ds.with_format("arrow")[opt.label_column].to_pylist()
        datasets.append((key, ds))
        labels += values
        where_split += [SPLIT_NAMES[key.lower()]] * len(values)
    class_names, y = _label_ids(labels, names, where_split)
    split = np.array([SPLITS.index(s) for s in where_split], dtype=np.int8)
    split, origins = _assign(split, y, set(where_split), opt, "split")
    offsets = np.cumsum([0] + [len(ds) for _, ds in datasets])
    column = opt.image_column

    def read(u: int) -> list[tuple[bytes, str]]:
        i = int(np.searchsorted(offsets, u, side="right")) - 1
        key, ds = datasets[i]
        row = u - int(offsets[i])
        return [_image_bytes(ds[row][column], f"{key}[{row}]", None)]

    fingerprints = [getattr(ds, "_fingerprint", len(ds)) for _, ds in datasets]
    return Pool(
        kind="hf",
        class_names=class_names,
        labels=y,
        split=split,
        unit_rows=np.ones(len(y), dtype=np.int64),
        read_unit=read,
        identity=digest([k for k, _ in datasets], fingerprints, y, split),
        origins=origins,
        notes=notes,
    )
