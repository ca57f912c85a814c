"""Writing checkpoints atomically, reading them safely, and starting a fine-tune from one.

Every file is read with `torch.load(..., weights_only=True)` (or safetensors): a checkpoint
that would run code when unpickled is refused before any of it runs. Every file is written
next to its target and renamed over it (`AtomicCheckpointIO`): a run killed while saving
leaves the previous checkpoint whole.

A checkpoint is a file, or with `trainer=fsdp trainer.fsdp_state_dict=sharded` a directory:
Lightning's `meta.pt` (everything but the weights and optimizer state) beside the shards
that torch.distributed.checkpoint (DCP) wrote, one per rank. `read_checkpoint` reads both
into the same dict, the sharded weights consolidated in memory without a process group.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    StorageMeta,
    TensorStorageMetadata,
)

from vitexp.data.files import fsync_dir
from vitexp.errors import CheckpointError
from vitexp.models.convert import load_timm_weights
from vitexp.models.factory import build_model, config_from_record, family_of
from vitexp.models.patch_embed import Size2d, to_2tuple
from vitexp.models.vit import ViTConfig

SHARDED_META = "meta.pt"  # Lightning's name for a sharded checkpoint's non-tensor state


RAW_WEIGHTS_KEY = "current_model_state"  # Lightning's weight averaging: the trained weights


def is_sharded(path: str | Path) -> bool:
    """A sharded (directory) checkpoint, as Lightning's FSDPStrategy writes it."""
    return (Path(path) / SHARDED_META).is_file()


def checkpoint_exists(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() or is_sharded(path)


def replace_dir(tmp: Path, path: Path) -> None:
    """Put the directory `tmp` where `path` (a file or directory) is. Directories cannot be
    swapped in one rename: the old one is renamed aside first, so that between the two
    renames (microseconds) only `.NAME.old` holds the previous checkpoint, never a mix."""
    old = path.with_name(f".{path.name}.old")
    remove_path(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    remove_path(old)
    fsync_dir(path.parent)


def remove_path(path: Path) -> None:
    """Delete a checkpoint, file or directory."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on local disks.

    Lightning writes through an fsspec transaction whose temporary file lives in the system
    temp directory; when that is another filesystem (a node's /tmp vs the shared run
    directory), the final move is a copy into the target, and a kill during it leaves a
    truncated checkpoint where the good one was. Here the bytes go to a hidden file in the
    target's own directory, are flushed to disk, and `os.replace` swaps them in. Under
    trainer=fsdp, Lightning hands it the `full` checkpoints (rank 0 writes them); `sharded`
    directories are swapped in by `vitexp.training.trainer.ShardedStrategy` with `replace_dir`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if "://" in str(path):  # object stores: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as err:
            # Ctrl-C during the write: torch's zip writer then fails on closing ("unexpected
            # pos") and that RuntimeError would hide the KeyboardInterrupt (a second Ctrl-C
            # must stop the run as one, exit 130)
            if isinstance(err.__context__, KeyboardInterrupt):
                raise err.__context__ from None
            raise
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_checkpoint(path: str | Path, what: str = "checkpoint", weights: bool = True) -> dict:
    """Load a checkpoint's contents on CPU, refusing anything but tensors and plain data.

    A sharded checkpoint gives its `meta.pt` with, unless `weights=False`, the model's
    weights consolidated into `state_dict` (the optimizer state is left on disk); every part
    of it is checked to load safely either way, since Lightning's resume reads it unchecked.
    """
    path = Path(path)
    if is_sharded(path):
        return _read_sharded(path, what, weights)
    if not path.is_file():
        raise CheckpointError(f"{what}={path} does not exist")
    return _load_file(path, what)


def _load_file(path: Path, what: str) -> dict[str, Any]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text:
            reason = "it holds Python objects other than tensors (refused: loading could run code)"
        elif path.stat().st_size == 0:
            reason = "the file is empty"
        elif "central directory" in text or "zipfile" in text or "zip archive" in text:
            reason = "not a complete torch.save file (truncated or another format)"
        else:
            reason = _first_line(err)
        raise CheckpointError(
            f"{what}={path} cannot be loaded: {reason}; copy it again or give another file"
        ) from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{what}={path} is not a checkpoint (a {type(content).__name__})")
    return content


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a plain pickle (torch reads it with `pickle.load`): allow only
    what DCP itself puts there, its own classes, torch.Size and dtypes."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}

    def find_class(self, module: str, name: str) -> Any:
        found = None if "." in name else getattr(sys.modules.get(module), name, None)
        if not (
            (module, name) in self.NAMES
            or (module in self.MODULES and isinstance(found, type) and found.__module__ == module)
            or (module == "torch" and isinstance(found, torch.dtype))
        ):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return super().find_class(module, name)


class _SafeReader(FileSystemReader):
    """DCP's file reader with the metadata unpickled safely (tensors it reads itself with
    weights_only=True)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _read_sharded(path: Path, what: str, weights: bool) -> dict[str, Any]:
    content = _load_file(path / SHARDED_META, what)
    try:
        reader = _SafeReader(path)
        metadata = reader.read_metadata()
        # the non-tensor entries (optimizer hyperparameters) that DCP would unpickle freely
        for index, info in metadata.storage_data.items():
            if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata):
                with open(path / info.relative_path, "rb") as f:
                    f.seek(info.offset)
                    torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        if weights:
            model = {
                fqn.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
                for fqn, md in metadata.state_dict_metadata.items()
                if fqn.startswith("model.") and isinstance(md, TensorStorageMetadata)
            }
            with warnings.catch_warnings():  # "no process group: loading in one process"
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({"model": model}, storage_reader=reader, no_dist=True)
            content["state_dict"] = model
    except Exception as err:
        text = str(err)
        reason = (
            "it holds Python objects other than tensors (refused: loading could run code)"
            if "not allowed" in text or "weights_only" in text or "Unsupported global" in text
            else _first_line(err)
        )
        raise CheckpointError(
            f"{what}={path} (sharded) cannot be loaded: {reason}; copy it again or give another"
        ) from None
    return content


def read_model(path: str | Path, what: str = "checkpoint") -> tuple[nn.Module, dict[str, Any]]:
    """The model of a vitexp checkpoint with its weights, in eval mode on the CPU, and the
    checkpoint's record (`checkpoint["vitexp"]`: stage, data, ...). The weights are the
    checkpoint's `state_dict`: of a run that kept a weight average (`ema.decay`), the
    average (the trained weights are in `current_model_state`, vitexp.training.averaging)."""
    return model_from(read_checkpoint(path, what), path, what)


def model_from(content: dict[str, Any], path: str | Path, what: str) -> tuple[nn.Module, dict]:
    """`read_model` of a checkpoint already read (`read_checkpoint`)."""
    meta = content.get("vitexp")
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise CheckpointError(f"{what}={path} is not a vitexp checkpoint (no model record)")
    prefix = "net."  # ViTModule.net
    state = {
        k.removeprefix(prefix): v
        for k, v in content.get("state_dict", {}).items()
        if k.startswith(prefix)
    }
    try:
        cfg, num_classes = config_from_record(meta)
        model = build_model(cfg, num_classes)
        model.load_state_dict(state)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{what}={path} is damaged: {_first_line(err)}") from None
    return model.eval(), meta


def weights_of(meta: dict[str, Any]) -> str:
    """Which weights a checkpoint's `state_dict` holds, in words, for reports."""
    decay = meta.get("ema_decay")
    return "trained" if decay is None else f"averaged (EMA {decay:g})"


def load_model(path: str | Path) -> nn.Module:
    """`vitexp.load_model("outputs/.../checkpoints/last.ckpt")`: the trained model, ready
    for evaluation (eval mode, CPU; `model.cfg` says what it is, `model.cfg.mean/std` the
    input normalisation it expects)."""
    return read_model(path)[0]


PATCH_KEYS = ("patch_size", "patch_stride")


def patch_change(saved: Any, wanted: Any) -> tuple[Size2d, Size2d] | None:
    """(pretrained, wanted) patch size of two ViT configs when they differ, else None."""
    if not (isinstance(saved, ViTConfig) and isinstance(wanted, ViTConfig)):
        return None
    old, new = (to_2tuple(c.patch_size, "patch_size") for c in (saved, wanted))
    return None if old == new else (old, new)


def patch_resampling(meta: dict[str, Any], model: nn.Module) -> str | None:
    """What `load_pretrained` did to the patch projection, for train.log (the run logs it
    once its directory exists), from the checkpoint's record `meta`; None if nothing."""
    old = meta.get("model_config", {}).get("patch_size")
    new = getattr(model.cfg, "patch_size", None)
    if old is None or new is None:
        return None
    old, new = to_2tuple(old, "patch_size"), to_2tuple(new, "patch_size")
    if old == new:
        return None
    return (
        f"pretrained patch embedding resampled from {old[0]}x{old[1]} to {new[0]}x{new[1]} "
        "(FlexiViT pseudo-inverse)"
    )


def _resamplable(cfg: ViTConfig) -> bool:
    """Non-overlapping patches of pixels: the patch embeddings FlexiViT resamples."""
    stride = cfg.patch_stride
    return cfg.stem == "patch" and (
        stride is None
        or to_2tuple(stride, "patch_stride") == to_2tuple(cfg.patch_size, "patch_size")
    )


def check_architecture(saved: Any, model: nn.Module, path: Path) -> None:
    """Name the first architecture key where the pretrained checkpoint and the config
    disagree (resolution and class count may differ: fine-tuning changes them; so may the
    patch size, between non-overlapping patches of pixels: the kernel is resampled)."""
    change = patch_change(saved, model.cfg)
    resamplable = change is not None and _resamplable(saved) and _resamplable(model.cfg)
    skip = PATCH_KEYS if resamplable else ()
    key, have, want = _first_difference(saved, model.cfg, "ARCHITECTURE", skip)
    if key is not None:
        why = (
            ": only non-overlapping patches of pixels (stem=patch, patch_stride=null) are "
            "resampled to another patch size"
            if key in PATCH_KEYS and change is not None
            else ""
        )
        raise CheckpointError(
            f"pretrained={path} has model.{key}={have} but the config has model.{key}="
            f"{want}{why}; fine-tune with the model the checkpoint was pretrained with"
        )


def check_resumable(record: dict[str, Any], model: nn.Module, path: Path) -> None:
    """A run resumes only with the model it was started with: every architecture key, the
    resolution, the class count and the pre-logits layer must agree."""
    try:
        saved, num_classes = config_from_record(record)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"ckpt_path={path} is damaged: {_first_line(err)}") from None
    key, have, want = _first_difference(saved, model.cfg, "RESUME")
    if key is None and num_classes != model.num_classes:
        key, have, want = "num_classes", num_classes, model.num_classes
    if key is not None:
        name = f"data.num_classes={want}" if key == "num_classes" else f"model.{key}={want}"
        raise CheckpointError(
            f"ckpt_path={path} was trained with model.{key}={have} but the config has "
            f"{name}; resume with the run's own settings (its config.yaml), or start a new "
            "run without ckpt_path"
        )


def _first_difference(saved: Any, wanted: Any, keys: str, skip: tuple[str, ...] = ()) -> tuple:
    """(key, saved value, wanted value) of the first of the config class's `keys` (but
    `skip`) that differs; the model family first."""
    if type(saved) is not type(wanted):
        return "family", family_of(saved), family_of(wanted)
    found = [d for d in saved.differences(wanted, getattr(type(saved), keys)) if d[0] not in skip]
    return found[0] if found else (None, None, None)


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory of `<run>/checkpoints/last.ckpt`, else the checkpoint's folder."""
    parent = Path(checkpoint).parent
    return parent.parent if parent.name == "checkpoints" else parent


def resolve_pretrained(path: str | Path) -> Path:
    """`pretrained=` as every command takes it: a checkpoint (a file, vitexp's or timm's, or a
    sharded directory), a run directory (its checkpoints/last.ckpt, else its newest
    best-*.ckpt) or a directory of runs, e.g. outputs/pretrain_in21k (the newest finished
    run's, as `ckpt_path=last` picks the newest run). An existing path that holds none of
    these is named as such, not as missing."""
    path = Path(path)
    if checkpoint_exists(path):
        return path
    if not path.exists():
        raise CheckpointError(f"pretrained={path} does not exist")
    own = run_checkpoint(path)
    if own is not None:
        return own
    runs = [run for run in sorted(path.iterdir()) if run_checkpoint(run) is not None]
    finished = [run for run in runs if (run / "results.json").is_file()]
    if finished:
        newest = max(finished, key=lambda run: (run / "results.json").stat().st_mtime)
        return run_checkpoint(newest)
    if runs:  # an unfinished pretraining is used only when named: pretrained=RUN
        raise CheckpointError(
            f"pretrained={path} holds no finished run: no results.json in "
            f"{', '.join(r.name for r in runs)}; to use an unfinished one, name it: "
            f"pretrained={runs[-1]}"
        )
    raise CheckpointError(
        f"pretrained={path} holds no checkpoint: expected a .ckpt file, a run directory with "
        "checkpoints/, or a directory of runs"
    )


def run_checkpoint(run: Path) -> Path | None:
    """A run directory's checkpoint: checkpoints/last.ckpt, else the newest best-*.ckpt."""
    last = run / "checkpoints" / "last.ckpt"
    if checkpoint_exists(last):
        return last
    best = [p for p in run.glob("checkpoints/best-*.ckpt") if checkpoint_exists(p)]
    return max(best, key=lambda p: p.stat().st_mtime) if best else None


def load_pretrained(path: str | Path, model: nn.Module, weights: str = "averaged") -> dict:
    """Initialise `model` (built at dataset B's resolution and class count) from a pretrained
    vitexp checkpoint or a timm-format weight file, the paper's way: keep the body, drop the
    pre-logits layer unless the model has one, start a zero-initialised head, and resample
    every position embedding to the new grid; at another patch size (`model.patch_size`),
    the patch projection too (FlexiViT's pseudo-inverse, `resample_patch_embed`). `weights`:
    of a run that kept a weight average (`ema.decay`), the `averaged` weights or the `raw`
    trained ones. Returns the checkpoint's record."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_timm(path, model)
    content = read_checkpoint(path, "pretrained")
    if "vitexp" not in content:
        return _load_timm(path, model)
    if weights == "raw" and RAW_WEIGHTS_KEY in content:
        content = {**content, "state_dict": content[RAW_WEIGHTS_KEY]}
    source, meta = model_from(content, path, "pretrained")
    check_architecture(source.cfg, model, path)
    # the fine-tune's own resampling settings apply
    if hasattr(model.cfg, "pos_embed"):
        source.cfg.pos_embed.interpolation = model.cfg.pos_embed.interpolation
        source.cfg.pos_embed.antialias = model.cfg.pos_embed.antialias
    source.reset_classifier(
        model.num_classes,
        keep_pre_logits=getattr(model.cfg, "representation_size", None) is not None,
    )
    change = patch_change(source.cfg, model.cfg)
    if change is None:
        source.resize(model.img_size)
    else:
        try:
            source.resize(model.img_size, patch_size=model.cfg.patch_size)
        except ValueError as err:
            raise CheckpointError(f"pretrained={path}: {_first_line(err)}") from None
    result = model.load_state_dict(source.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"pretrained={path} does not fit the model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    return meta


def _load_timm(path: Path, model: nn.Module) -> dict[str, Any]:
    try:
        load_timm_weights(model, path)
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(f"pretrained={path}: {_first_line(err)}") from None
    return {"source": "timm", "path": str(path)}
