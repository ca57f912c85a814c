"""Decoding images of any kind into the model's RGB input, and what a corrupt one does
(`data.on_corrupt`): odd modes (greyscale, palette, CMYK, alpha, 16-bit), huge files
decoded at reduced size, truncated and unreadable files."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vitexp.errors import DataError

_SKIPPED: set[str] = set()  # corrupt files already reported by this process


# the files image folders, figures and predict read as images
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# --- decoding ----------------------------------------------------------------------------
class ImageDecoder:
    """Bytes, a path, an HF `{"bytes", "path"}` dict or a PIL image -> PIL RGB, or None for
    a corrupt image under on_corrupt=skip (warned once per file, with a running count).

    Large JPEGs are decoded at a reduced scale (`Image.draft`) whose shorter side stays
    >= min_size; images above PIL's decompression-bomb limit count as corrupt.
    """

    def __init__(self, on_corrupt: str = "error", min_size: int = 0, key: str = "data") -> None:
        self.on_corrupt = on_corrupt
        self.min_size = min_size
        self.switch = f"{key}.on_corrupt" if key else "on_corrupt"  # named in messages

    def __call__(self, src: Any, name: str) -> Image.Image | None:
        try:
            return self._decode(src)
        except DataError:
            raise
        except UnidentifiedImageError:
            return self._corrupt(name, "not an image file PIL can read")
        except Image.DecompressionBombError:
            return self._corrupt(name, _bomb_message())
        except Exception as err:  # truncated data, bad headers...: each plugin fails its own way
            return self._corrupt(name, f"{type(err).__name__}: {str(err).splitlines()[0]}")

    def _decode(self, src: Any) -> Image.Image:
        if isinstance(src, Image.Image):
            return to_rgb(src)
        if isinstance(src, dict):
            src = src["bytes"] if src.get("bytes") is not None else src.get("path")
        if isinstance(src, (str, os.PathLike)):
            src = Path(src).read_bytes()  # no open file handle outlives the call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(src))
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:
            raise Image.DecompressionBombError(_bomb_message())
        if img.format == "JPEG" and self.min_size:
            img.draft("RGB", (self.min_size, self.min_size))  # DCT scaling: 1/2, 1/4, 1/8
        img.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
        return to_rgb(img)

    def _corrupt(self, name: str, reason: str) -> None:
        if self.on_corrupt == "error":
            raise DataError(
                f"{name}: unreadable image ({reason}); repair or remove it, "
                f"or set {self.switch}=skip"
            )
        if name not in _SKIPPED:
            _SKIPPED.add(name)
            warnings.warn(
                f"skipping unreadable image {name} ({reason}); {len(_SKIPPED)} skipped so far "
                f"({self.switch}=skip)",
                stacklevel=3,
            )
        return None


def _bomb_message() -> str:
    return (
        f"more than PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS)"
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency (RGBA, LA, PA, P with a transparent colour) is
    composited on white, as a viewer shows it. 16-bit greyscale (I;16*, and I when in
    0..65535) is divided by 257; float F is read as 0..1 or 0..255; other ranges of I / F
    are min-max scaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        low, high = a.min(), a.max()
        if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
            a = a / 257.0  # 65535 -> 255: a rescale, not a clip
        elif mode == "F" and low >= 0 and high <= 1:
            a = a * 255.0
        elif not (mode == "F" and low >= 0 and high <= 255) and high > low:
            a = (a - low) * (255.0 / (high - low))
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
