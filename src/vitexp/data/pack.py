"""Packing: an image folder, parquet files or a Hugging Face dataset -> Lightning's litdata
chunks, which `data=litdata data.root=DIR` trains from (`python -m vitexp.pack src=PATH
out=DIR` runs `pack`).

Why pack: millions of small files (ImageNet-21k: 14M) cost a metadata lookup each on a
shared cluster file system, every epoch, on every node; a pack is a few thousand ~64 MB
chunks read sequentially. Images keep their encoded bytes (no re-encoding: a JPEG stays
that JPEG); rows are shuffled (seeded) before they are written, so that every chunk mixes
classes, since a training batch comes from a few chunks.

The order of work, so that an interruption (kill, power loss, Ctrl-C) costs at most a
chunk per split: everything is listed and checked, and nothing is written, until the
plan is known; then out/.vitexp_pack/plan.json, then chunks, each split's progress saved
after every chunk (litdata's writer checkpoint); then each split's index.json and
labels.npy; `vitexp_pack.json` last. A re-run with the same arguments finishes what an
interrupted one started (from the last saved chunk); with other arguments or changed
input files it refuses in one line.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitexp.errors import ConfigError, DataError


@dataclass
class PackCommandConfig:
    src: Any = None  # an image folder, parquet file(s)/glob/folder, a saved HF dataset, hf:NAME
    out: str | None = None  # the pack's folder (data.root of data=litdata)
    seed: int = 0  # the packing order, and the held-out splits (as data.seed)
    val_fraction: float = 0.1  # of train (after test), where the source has no val split
    test_fraction: float = 0.2  # of train, where the source has no test split
    chunk_bytes: str = "64MB"  # litdata's chunk size
    shuffle_window: int = 10_000  # parquet: rows read and shuffled together (row groups in order)
    image_column: str = "image"  # parquet / HF
    label_column: str = "label"  # parquet / HF
    splits: Any = None  # parquet / HF: the source's splits to pack (null: train/validation/test)
    threads: int = 8  # concurrent reads (file systems with latency)
    progress: bool = True  # rich progress bar


def parse_bytes(value: Any) -> int:
    """ "64MB", "512KiB", 1000000 -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30}
    found = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not found or found.group(2).lower() not in units:
        raise ConfigError(f"chunk_bytes={value!r} is not a size; e.g. chunk_bytes=64MB")
    size = int(float(found.group(1)) * units[found.group(2).lower()])
    if size < 1:
        raise ConfigError(f"chunk_bytes={value!r} must be > 0")
    return size


def _check(c: PackCommandConfig) -> None:
    if c.src in (None, "", []):
        raise ConfigError("src is not set; give the data to pack: src=PATH (or src=hf:NAME)")
    if not c.out:
        raise ConfigError("out is not set; give the pack's folder: out=DIR")
    for key in ("val_fraction", "test_fraction"):
        if not 0 <= getattr(c, key) < 1:
            raise ConfigError(f"{key}={getattr(c, key)!r} must be in [0, 1)")
    if c.threads < 1 or c.shuffle_window < 1:
        raise ConfigError(f"threads={c.threads} and shuffle_window={c.shuffle_window} must be >= 1")
    if type(c.seed) is not int or c.seed < 0:
        raise ConfigError(f"seed={c.seed!r} must be an int >= 0")
    parse_bytes(c.chunk_bytes)


def _args(c: PackCommandConfig) -> dict[str, Any]:
    """The arguments that decide a pack's content (not threads or progress), src resolved."""
    src = c.src if isinstance(c.src, str) else [str(s) for s in c.src]

    def resolved(s: str) -> str:
        return s if s.startswith("hf:") else str(Path(s).expanduser().resolve())

    args = {k: v for k, v in asdict(c).items() if k not in ("out", "threads", "progress")}
    args["src"] = resolved(src) if isinstance(src, str) else [resolved(s) for s in src]
    args["chunk_bytes"] = parse_bytes(c.chunk_bytes)
    args["splits"] = None if c.splits is None else [str(s) for s in c.splits]
    return args


def _shown(args: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in args.items() if k != "chunk_bytes") + (
        f" chunk_bytes={args['chunk_bytes']}"
    )


# --- the plan ------------------------------------------------------------------------------
@dataclass
class Plan:
    """The order rows are written in. `rows[p]` is the row at stream position p, `window[p]`
    the read window it belongs to (non-decreasing), `split[p]` its split, `k[p]` its index
    in that split."""

    rows: np.ndarray
    window: np.ndarray
    split: np.ndarray
    k: np.ndarray


def make_plan(pool, seed: int, window_rows: int) -> Plan:
    """Units in a seeded random order, grouped into windows of about `window_rows` rows
    (one unit each when every unit is one row: a full shuffle), rows shuffled within a window."""
    rng = np.random.default_rng([seed % 2**64, 7])
    n = pool.unit_rows
    perm = rng.permutation(len(n))
    first = np.concatenate([[0], np.cumsum(n)[:-1]])  # first row of each unit
    counts = n[perm]
    before = np.concatenate([[0], np.cumsum(counts)[:-1]])  # rows before each permuted unit
    rows = np.repeat(first[perm] - before, counts) + np.arange(int(counts.sum()))
    width = 1 if pool.random_access else window_rows
    window = np.repeat(before // width, counts)
    rows = rows[np.lexsort((rng.random(len(rows)), window))]
    split = pool.split[rows]
    k = np.zeros(len(rows), dtype=np.int64)
    for s in range(3):
        at = split == s
        k[at] = np.arange(int(at.sum()))
    return Plan(rows, window, split, k)


# --- the out folder ------------------------------------------------------------------------
def _existing(out: Path, args: dict[str, Any]) -> dict | None:
    """What out= holds: None (nothing: start), the manifest of this same complete pack, or
    a refusal; an unfinished pack is checked against the plan later."""
    from vitexp.data.litdata import MANIFEST, STATE_DIR, read_manifest

    if out.exists() and not out.is_dir():
        raise DataError(f"out={out} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out, "out")
        if manifest.get("args") != args:
            raise DataError(
                f"out={out} already holds a complete pack of other data or arguments "
                f"({_shown(manifest.get('args', {}))}); nothing was changed: choose another "
                "out= (or delete that folder)"
            )
        return manifest
    if not (out / STATE_DIR / "plan.json").is_file():
        raise DataError(
            f"out={out} is not empty and holds no vitexp pack; choose an empty or new folder"
        )
    return None


def _check_unfinished(out: Path, fingerprint: str, args: dict[str, Any]) -> bool:
    """True when out= holds an unfinished pack of this plan (continue it); refuse another."""
    from vitexp.data.litdata import STATE_DIR

    plan = out / STATE_DIR / "plan.json"
    if not plan.is_file():
        return False
    started = json.loads(plan.read_text())
    if started.get("fingerprint") != fingerprint:
        changed = (
            "the same arguments but changed input files"
            if started.get("args") == args
            else (f"other arguments ({_shown(started.get('args', {}))})")
        )
        raise DataError(
            f"out={out} holds an unfinished pack started with {changed}; re-run that "
            "command to finish it, or delete the folder to start over"
        )
    return True


# --- writing ---------------------------------------------------------------------------------
class SplitWriter:
    """litdata's BinaryWriter for one split, its progress saved after every chunk."""

    def __init__(self, folder: Path, state: Path, chunk_bytes: int) -> None:
        from litdata.streaming.writer import BinaryWriter
        from litdata.utilities.env import _DistributedEnv

        self.folder, self.state = folder, state
        self.writer = BinaryWriter(str(folder), chunk_bytes=chunk_bytes)
        # one process writes a pack: never a rank of the job it may run in (WORLD_SIZE,
        # GLOBAL_RANK), whose writer would name its chunks after that rank and wait for
        # the other ranks' indexes before writing index.json
        self.writer._distributed_env = _DistributedEnv(world_size=1, global_rank=0, num_nodes=1)
        self.writer._rank = 0
        self.done = 0  # rows in saved chunks

    def resume(self) -> None:
        """Continue from the last saved chunk: the chunks after it (and a chunk being
        written when the pack stopped) are removed and written again."""
        saved = self.state / "checkpoint-0.json"
        kept: set[str] = set()
        if saved.is_file():
            ck = json.loads(saved.read_text())
            w = self.writer
            # what litdata's own optimize(use_checkpoint=True) restores
            w._chunks_info, w._checkpoint_config = ck["chunks"], ck["config"]
            w._chunk_index = ck["next_chunk_index"]
            w.last_checkpoint_chunk_info = [dict(c) for c in ck["chunks"]]
            self.done = ck["samples_written"]
            kept = {c["filename"] for c in ck["chunks"]}
        for f in self.folder.iterdir():
            if f.name not in kept:
                f.unlink()

    def add(self, k: int, item: tuple) -> None:
        if self.writer.add_item(k, item) is not None:  # a chunk was written
            self.writer.save_checkpoint(str(self.state))

    def finish(self, labels: np.ndarray) -> None:
        """The last chunk, labels.npy, then index.json (renamed into place): a split with an
        index.json is complete."""
        self.writer.done()
        np.save(self.folder / "labels.npy", labels.astype(np.int32))
        self.writer.merge()


def _resume_position(plan: Plan, done: list[int], totals: list[int]) -> int | None:
    """The first stream position to read again: the start of the window holding the first
    row not yet saved of any split (None: all saved). Rows before it are not read at all."""
    first = [np.flatnonzero(plan.split == s)[done[s]] for s in range(3) if done[s] < totals[s]]
    if not first:
        return None
    return int(np.searchsorted(plan.window, plan.window[min(first)]))


def _prefetch(fn, items: Iterator, threads: int) -> Iterator:
    """fn(item) for each item, in order, `threads` at a time."""
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _stream(pool, plan: Plan, start: int, threads: int) -> Iterator[tuple[int, bytes, str]]:
    """(stream position, image bytes, source name) from `start` on, reading unit by unit."""
    unit_of_row = np.repeat(np.arange(len(pool.unit_rows)), pool.unit_rows)
    first_row = np.concatenate([[0], np.cumsum(pool.unit_rows)[:-1]])
    ends = np.flatnonzero(np.diff(plan.window[start:], append=-1)) + start + 1
    bounds = zip(np.concatenate([[start], ends[:-1]]), ends, strict=True)
    windows = ((a, b, list(dict.fromkeys(unit_of_row[plan.rows[a:b]].tolist()))) for a, b in bounds)

    def units():
        for a, b, us in windows:
            for j, u in enumerate(us):
                yield (a, b, j == len(us) - 1), u

    loaded: dict[int, list[tuple[bytes, str]]] = {}
    reads = _prefetch(lambda x: (x[0], x[1], pool.read_unit(x[1])), units(), threads)
    for (a, b, last), u, rows in reads:
        loaded[u] = rows
        if not last:
            continue
        for p in range(a, b):
            row = int(plan.rows[p])
            data, name = loaded[int(unit_of_row[row])][row - int(first_row[unit_of_row[row]])]
            yield p, data, name
        loaded.clear()


def pack(c: PackCommandConfig) -> dict[str, Any]:
    """Pack `c.src` into `c.out`; returns the manifest."""
    from vitexp.data.files import write_atomic
    from vitexp.data.litdata import FORMAT, MANIFEST, SPLITS, STATE_DIR
    from vitexp.data.pack_sources import Options, digest, open_source

    _check(c)
    args, out = _args(c), Path(c.out).expanduser()
    complete = _existing(out, args)
    if complete is not None:
        print(f"out={out} already holds this pack ({_counts(complete)}); nothing to do")
        return complete
    opt = Options(c.seed, c.val_fraction, c.test_fraction, c.image_column, c.label_column, c.splits)
    started = time.time()
    pool = open_source(c.src, opt)
    plan = make_plan(pool, c.seed, c.shuffle_window)
    fingerprint = digest(FORMAT, args, pool.identity)
    resuming = _check_unfinished(out, fingerprint, args)
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    if not resuming:
        write_atomic(state / "plan.json", json.dumps({"fingerprint": fingerprint, "args": args}))
    totals = [int((plan.split == s).sum()) for s in range(3)]
    writers: dict[int, SplitWriter] = {}
    for s, name in enumerate(SPLITS):
        if totals[s] and not (out / name / "index.json").is_file():
            (out / name).mkdir(exist_ok=True)
            writers[s] = SplitWriter(out / name, state / name, args["chunk_bytes"])
            writers[s].resume()
    done = [totals[s] if s not in writers else writers[s].done for s in range(3)]
    start = _resume_position(plan, done, totals)
    if start is not None:
        if sum(done):
            print(f"continuing the pack in {out}: {sum(done)} of {len(plan.rows)} images written")
        with _progress(c.progress, len(plan.rows), sum(done)) as advance:
            for p, data, name in _stream(pool, plan, start, c.threads):
                s, k = int(plan.split[p]), int(plan.k[p])
                if s in writers and k >= done[s]:
                    writers[s].add(k, (data, int(pool.labels[plan.rows[p]]), k, name))
                    advance(len(data))
    for s, writer in writers.items():
        writer.finish(pool.labels[plan.rows[plan.split == s]])
    manifest = _manifest(out, pool, plan, args, fingerprint)
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    shutil.rmtree(state, ignore_errors=True)
    seconds = time.time() - started
    size = sum(manifest["splits"][s]["bytes"] for s in SPLITS)
    print(
        f"packed {_counts(manifest)} into {out}: {size / 1e9:.2f} GB in {seconds:.0f} s; "
        f"train with data=litdata data.root={out}"
    )
    for note in pool.notes:
        print(f"note: {note}")
    return manifest


def _counts(manifest: dict[str, Any]) -> str:
    s = manifest["splits"]
    return (
        f"{len(manifest['class_names'])} classes; train {s['train']['images']}, "
        f"val {s['val']['images']}, test {s['test']['images']} images"
    )


def _manifest(out: Path, pool, plan: Plan, args: dict, fingerprint: str) -> dict[str, Any]:
    from vitexp.data.litdata import FORMAT, SPLITS

    splits = {}
    for s, name in enumerate(SPLITS):
        labels = pool.labels[plan.rows[plan.split == s]]
        index = out / name / "index.json"
        chunks = json.loads(index.read_text())["chunks"] if index.is_file() else []
        splits[name] = {
            "images": len(labels),
            "bytes": sum(ch["chunk_bytes"] for ch in chunks),
            "chunks": len(chunks),
            "from": pool.origins.get(name, ""),
            "class_counts": np.bincount(labels, minlength=len(pool.class_names)).tolist(),
        }
    return {
        "format": FORMAT,
        "source": pool.kind,
        "args": args,
        "fingerprint": fingerprint,
        "class_names": pool.class_names,
        "splits": splits,
        "row": ["image bytes as stored", "label", "index in split", "source name"],
        "made": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class _progress:
    """A rich bar over all images (or nothing): images, MB/s, elapsed and remaining time."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done
        self.bytes, self.started = 0, time.time()

    def __enter__(self):
        if not self.enabled:
            return lambda size: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("pack"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.bar.start()
        self.task = self.bar.add_task("pack", total=self.total, completed=self.done, rate="")
        return self.advance

    def advance(self, size: int) -> None:
        self.bytes += size
        elapsed = max(time.time() - self.started, 1e-9)
        self.bar.update(self.task, advance=1, rate=f"{self.bytes / elapsed / 1e6:.0f} MB/s")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
