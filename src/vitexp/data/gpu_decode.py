"""`data.decode=gpu`: JPEG decoding, crop, flip and normalisation on the training device.

Why: on a node with few CPU cores per GPU the loader workers cannot decode and augment
JPEGs as fast as the GPU trains. With decode=gpu a worker only reads a JPEG's bytes and its
header (size, mode) and draws the sample's random choices from the sample's seed, exactly
as decode=cpu draws them (the same RandomResizedCrop box, flip and RandAugment ops: a
resumed run stays exact); the device decodes the whole batch in one call (torchvision's
`decode_jpeg` on a list: nvjpeg on CUDA, libjpeg-turbo on the CPU) and crops, resizes,
flips, augments and normalises there.

    worker:  DeferredDecoder(value, name)  -> Encoded (a JPEG nvjpeg takes) or PIL (others)
             DeviceTransform(image)        -> Pending: bytes or uint8 pixels + the draws
             PendingCollate(items)         -> PendingBatch
    device:  PendingBatch.to(device)       (Lightning moves labels and pixels; bytes stay
                                            on the host, where decode_jpeg reads them)
             DeviceStage(batch)            -> (images float32 (B, 3, H, W), labels (B,))

Images that are not JPEGs nvjpeg takes (PNG, CMYK, truncated-looking files...) are decoded
by PIL in the worker as with decode=cpu and travel as uint8 pixels, so any batch may mix
both; sources that hold pixels (digits, shapes, CIFAR) send uint8 pixels the same way. A
JPEG the device cannot decode is tried by PIL, on the host: if PIL cannot either, it is
corrupt, and data.on_corrupt decides (skip: the batch is one short; error: one line naming
the file), as it does in the workers with decode=cpu.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vitexp.data.images import ImageDecoder
from vitexp.data.transforms import ToNormalizedTensor

log = logging.getLogger("vitexp")
NVJPEG_MODES = ("RGB", "L")  # YCbCr colour and greyscale; nvjpeg has no CMYK / YCCK


# --- worker side: bytes and draws ------------------------------------------------------------
@dataclass
class Encoded:
    """A JPEG left undecoded. `size` (h, w) is what decode=cpu decodes it at (PIL's DCT
    scaling of large JPEGs, `Image.draft`, divides the full size by `scale`): the random
    crop is drawn on that size, and scaled to the full decode on the device."""

    data: torch.Tensor  # uint8 (N,): the file's bytes
    name: str
    size: tuple[int, int]
    scale: int = 1


class DeferredDecoder(ImageDecoder):
    """The sources' decoder with data.decode=gpu: a JPEG that nvjpeg can decode is returned
    as `Encoded` after reading its header only; anything else goes through ImageDecoder
    (PIL RGB, or None / DataError when corrupt)."""

    def __call__(self, src: Any, name: str) -> Encoded | Image.Image | None:
        data = _read(src)
        if data is not None and (encoded := self._encoded(data, name)) is not None:
            return encoded
        return super().__call__(src if data is None else data, name)

    def _encoded(self, data: bytes, name: str) -> Encoded | None:
        """None unless the bytes look like a whole JPEG nvjpeg takes (PIL then decides)."""
        if data[:2] != b"\xff\xd8" or b"\xff\xd9" not in data[-32:]:  # SOI ... EOI
            return None  # not a JPEG, or truncated: PIL decodes (or reports) it
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))  # parses the header; decodes nothing
        except Exception:  # noqa: BLE001 - a bad header: ImageDecoder names the error
            return None
        limit = Image.MAX_IMAGE_PIXELS
        if img.format != "JPEG" or img.mode not in NVJPEG_MODES:
            return None
        if limit and img.width * img.height > limit:
            return None
        scale = 1
        if self.min_size:  # the draft ImageDecoder applies, read without decoding
            full_w, drafted = img.width, img.draft("RGB", (self.min_size, self.min_size))
            scale = round(full_w / drafted[1][2]) if drafted else 1  # box: the size / scale
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return Encoded(tensor, name, (img.height, img.width), scale)


def _read(src: Any) -> bytes | None:
    """The encoded bytes of a source value (None: a PIL image, or unreadable here)."""
    if isinstance(src, dict):
        src = src["bytes"] if src.get("bytes") is not None else src.get("path")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, (str, os.PathLike)):
        try:
            return Path(src).read_bytes()
        except OSError:
            return None  # ImageDecoder reports it
    return None


@dataclass
class Pending:
    """One sample for the device: JPEG bytes (`encoded`) or uint8 (3, H, W) pixels, and
    what to do with it. `box` (top, left, height, width) is in the source's full-size
    pixels (the random crop), None for evaluation's framing (eval, and training without
    the random crop); `rng` is the CPU generator's state where
    decode=cpu's RandAugment would start drawing (None: no RandAugment)."""

    source: torch.Tensor
    encoded: bool
    name: str
    box: tuple[int, int, int, int] | None = None
    flip: bool = False
    rng: torch.Tensor | None = None


class DeviceTransform:
    """Stands in for a `build_transforms` pipeline in the loader workers with decode=gpu:
    draws what that pipeline would draw, in the same order from the same generator, and
    leaves the pixels to `DeviceStage`."""

    def __init__(self, pipeline: v2.Compose, train: bool) -> None:
        self.train = train
        self.is_random = getattr(pipeline, "is_random", False)
        ops = list(pipeline.transforms)
        self.crop = next((op for op in ops if isinstance(op, v2.RandomResizedCrop)), None)
        flip = next((op for op in ops if isinstance(op, v2.RandomHorizontalFlip)), None)
        self.flip_p = flip.p if flip is not None else None
        self.randaugment = any(isinstance(op, v2.RandAugment) for op in ops)

    def __call__(self, img: Encoded | Image.Image | torch.Tensor) -> Pending:
        if isinstance(img, Encoded):
            source, encoded, name, (h, w), scale = img.data, True, img.name, img.size, img.scale
        else:
            source, encoded, name, scale = _pixels(img), False, "", 1
            h, w = source.shape[-2:]
        item = Pending(source, encoded, name)
        if not self.train:
            return item
        if self.crop is not None:  # v2.RandomResizedCrop's own draws, on the size alone
            p = self.crop.make_params([torch.empty((0, h, w), dtype=torch.uint8)])
            item.box = _scaled((p["top"], p["left"], p["height"], p["width"]), scale)
        # without the random crop the device frames the image as evaluation does
        if self.flip_p is not None:
            item.flip = bool(torch.rand(1) < self.flip_p)  # as v2's _RandomApplyTransform
        if self.randaugment:
            item.rng = torch.get_rng_state()
        return item


def _pixels(img: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img.as_subclass(torch.Tensor)
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def _scaled(box: tuple[int, int, int, int], scale: int) -> tuple[int, int, int, int]:
    """A box drawn on a DCT-scaled size, in the full decode's pixels: scaled pixel i covers
    full pixels [i * scale, (i + 1) * scale) (`_crop` cuts it at the image's edge)."""
    top, left, height, width = box
    return top * scale, left * scale, height * scale, width * scale


@dataclass
class PendingBatch:
    """A collated batch for the device. Lightning calls `pin_memory` (in the loader) and
    `to(device)`: labels and pixels move, JPEG bytes stay on the host."""

    items: list[Pending]
    labels: torch.Tensor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> PendingBatch:
        items = [
            it if it.encoded else replace(it, source=it.source.pin_memory()) for it in self.items
        ]
        return PendingBatch(items, self.labels.pin_memory(), self.device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PendingBatch:
        device = torch.device(device)
        move = dict(device=device, non_blocking=non_blocking)
        items = [
            it if it.encoded else replace(it, source=it.source.to(**move)) for it in self.items
        ]
        return PendingBatch(items, self.labels.to(**move), device)


class PendingCollate:
    """The collate_fn with decode=gpu: (Pending | None, label) items -> PendingBatch; the
    None items of skipped corrupt images are dropped, as `datamodule.Collate` does."""

    def __call__(self, batch: list) -> PendingBatch:
        kept = [entry for entry in batch if entry is not None]
        labels = torch.tensor([int(label) for _, label in kept], dtype=torch.int64)
        return PendingBatch([item for item, _ in kept], labels)


# --- device side -----------------------------------------------------------------------------
class DeviceStage:
    """PendingBatch -> (images, labels) on the batch's device: one batched JPEG decode,
    then per image the crop + antialiased resize (train) or the eval resize and center crop,
    the flip, RandAugment (the worker's generator state restored: the same ops as
    decode=cpu), then the normalisation of `ToNormalizedTensor` on the whole batch."""

    def __init__(
        self,
        train_pipeline: v2.Compose,
        eval_pipeline: v2.Compose,
        img_size: tuple[int, int],
        mean: list[float],
        std: list[float],
        on_corrupt: str = "error",
    ) -> None:
        self.img_size = img_size
        self.eval_ops = v2.Compose(
            [op for op in eval_pipeline.transforms if not isinstance(op, ToNormalizedTensor)]
        )
        ops = [op for op in train_pipeline.transforms if isinstance(op, v2.RandAugment)]
        self.randaugment = ops[0] if ops else None
        self.mean, self.std = list(mean), list(std)
        self._normalize: dict[torch.device, ToNormalizedTensor] = {}  # per device
        self.fallback = ImageDecoder(on_corrupt, 0)  # full size: the boxes are in its pixels
        self.rescued = 0  # JPEGs the device could not decode and PIL could

    def __call__(self, batch: PendingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        device = batch.device
        pixels = self._decode(batch.items, device)
        kept = [i for i, img in enumerate(pixels) if img is not None]
        out = [self._geometry(batch.items[i], pixels[i]) for i in kept]
        if not out:
            return torch.zeros(0, 3, *self.img_size, device=device), batch.labels[:0]
        if device not in self._normalize:
            norm = self._normalize[device] = ToNormalizedTensor(self.mean, self.std)
            norm.mean, norm.std = norm.mean.to(device), norm.std.to(device)
        images = self._normalize[device](torch.stack(out))
        labels = batch.labels if len(kept) == len(pixels) else batch.labels[kept]
        return images, labels

    def _decode(self, items: list[Pending], device: torch.device) -> list[torch.Tensor | None]:
        """uint8 (3, H, W) per item on `device`; None for a corrupt image skipped."""
        out: list[torch.Tensor | None] = [None if it.encoded else it.source for it in items]
        jpegs = [i for i, it in enumerate(items) if it.encoded]
        if not jpegs:
            return out
        decoded = decode_batch([items[i].source for i in jpegs], device)
        for i, img in zip(jpegs, decoded, strict=True):
            out[i] = img if img is not None else self._on_host(items[i], device)
        return out

    def _on_host(self, item: Pending, device: torch.device) -> torch.Tensor | None:
        """A JPEG the device refused: PIL decodes it, or it is corrupt (data.on_corrupt)."""
        img = self.fallback(item.source.numpy().tobytes(), item.name)  # DataError / None
        if img is None:
            return None
        self.rescued += 1
        if self.rescued == 1:
            log.warning(
                "data.decode=gpu: %s could not be decoded on %s and was decoded by PIL on "
                "the CPU (further ones are not reported)",
                item.name,
                device,
            )
        return _pixels(img).to(device)

    def _geometry(self, item: Pending, img: torch.Tensor) -> torch.Tensor:
        img = self.eval_ops(img) if item.box is None else _crop(img, item.box, self.img_size)
        if item.flip:
            img = TF.horizontal_flip(img)
        if item.rng is not None and self.randaugment is not None:
            with torch.random.fork_rng(devices=[]):  # the training RNG stays as it was
                torch.set_rng_state(item.rng)
                img = self.randaugment(img)
        return img


def _crop(img: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]):
    """v2.RandomResizedCrop's transform for a given box, the box cut at the image's edge
    (a DCT-scaled box can reach a few pixels past the full decode)."""
    top, left, height, width = box
    h, w = img.shape[-2:]
    height, width = min(height, h - top), min(width, w - left)
    return TF.resized_crop(img, top, left, height, width, list(size), antialias=True)


def decode_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 (3, H, W) per JPEG on `device`, one batched call (nvjpeg on CUDA); when the
    batch fails, each image alone, None where it fails (torchvision returns no partial
    results)."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (TorchCodec)
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for one in data:
            try:
                out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


# --- map-style access with decode=gpu --------------------------------------------------------
class Decoded(Dataset):
    """A split whose decoder is a DeferredDecoder, with its JPEGs decoded by PIL (as
    decode=cpu would): few-shot evaluation and the pixel baselines read these."""

    def __init__(self, ds: Dataset, on_corrupt: str, min_size: int) -> None:
        self.ds, self.decoder = ds, ImageDecoder(on_corrupt, min_size)
        self.labels = ds.labels

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, label = self.ds[i]
        if isinstance(img, Encoded):
            img = self.decoder(img.data.numpy().tobytes(), img.name)
        return img, label
