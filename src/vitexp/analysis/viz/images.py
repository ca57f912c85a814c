"""Input images for the figures: the user's folder, or scikit-learn's two bundled photographs
(china.jpg, flower.jpg; no download), centre-cropped to the model's aspect and resized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from vitexp.data.images import IMAGE_SUFFIXES
from vitexp.errors import ConfigError, DataError
from vitexp.models.patch_embed import Size2d

HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def center_crop_resize(image: Image.Image, size: Size2d) -> Image.Image:
    """The largest centred crop with the aspect of `size` (height, width), resized to it."""
    h, w = size
    width, height = image.size
    scale = min(width / w, height / h)
    cw, ch = w * scale, h * scale
    left, top = (width - cw) / 2, (height - ch) / 2
    return image.resize((w, h), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))


def _convert(image: Image.Image, in_chans: int) -> Image.Image:
    """Any PIL mode -> RGB (or L for a 1-channel model); 16-bit and float images are scaled
    to 8 bits by their maximum first."""
    if image.mode in HIGH_DEPTH_MODES:
        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max()
        arr = arr * (255.0 / hi) if hi > 0 else arr
        image = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L")
    return image.convert("RGB" if in_chans == 3 else "L")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_image(path: Path, size: Size2d, in_chans: int = 3) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 image at `size`; DataError if the file cannot be decoded."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            return np.asarray(center_crop_resize(_convert(image, in_chans), size))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"images: cannot read {path}: {_first_line(err)}") from None


def load_images(
    directory: str | Path | None, size: Size2d, in_chans: int = 3, max_images: int = 8
) -> tuple[list[np.ndarray], list[str]]:
    """Images for the figures and their names: the first `max_images` image files of
    `directory` (sorted by name; other files are ignored), or scikit-learn's samples."""
    if in_chans not in (1, 3):
        raise ConfigError(f"the model takes {in_chans}-channel input; figures need 1 or 3")
    if directory is None:
        from sklearn.datasets import load_sample_images

        samples = load_sample_images()
        names = [Path(f).name for f in samples.filenames][:max_images]
        images = [
            np.asarray(center_crop_resize(_convert(Image.fromarray(a), in_chans), size))
            for a in samples.images[:max_images]
        ]
        return images, names
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"images={directory} is not a directory; give a folder of images")
    files = sorted(
        f for f in directory.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DataError(f"images={directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    files = files[:max_images]
    return [read_image(f, size, in_chans) for f in files], [f.name for f in files]


def to_batch(images: list[np.ndarray], mean, std) -> torch.Tensor:
    """uint8 images -> normalised float batch (B, C, H, W)."""
    x = torch.from_numpy(np.stack(images)).float() / 255.0
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    if mean.shape[1] not in (1, x.shape[1]) or std.shape[1] not in (1, x.shape[1]):
        raise ConfigError(
            f"normalisation mean/std have {mean.shape[1]}/{std.shape[1]} values for "
            f"{x.shape[1]}-channel images"
        )
    return (x - mean) / std
