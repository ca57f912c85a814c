"""Procedural "shapes": a pretraining set whose labels depend on where things are.

Class `c` is (shape type `c // 4`, quadrant `c % 4`): one shape of that type is drawn at a
random position, size, stroke width, rotation and colour inside its quadrant of the image
(0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right), over a noisy background with a
random low-frequency shading and a few small specks of clutter. The same shape in two
quadrants is two classes, and everything but the quadrant is drawn from the same
distribution in both, so a model that sees an unordered set of patches (a ViT without
position embeddings) cannot tell them apart: it is capped at 1/4 accuracy per shape type.
Half of the 16 types are strokes of varied width (outlines, crosses, bars, arcs, zigzags,
waves) and a third of the images are greyscale, so the features carry over to handwritten
digits.

Image `i` of a split is made from `np.random.default_rng([seed, split_id, i])`, so the
result does not depend on workers or read order. Rendering costs ~0.5 ms an image, so the
pixels are kept: with `cache_dir` (data.shapes.cache_dir), a split is rendered once into a
.npy file there that every later run and loader worker maps (a sweep renders nothing);
without it, each worker keeps the images it made (up to 1 GiB a split) for later epochs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

SHAPE_TYPES = (
    "disc",
    "ring",
    "square",
    "square_outline",
    "triangle",
    "triangle_outline",
    "plus",
    "x",
    "bars",
    "arc",
    "corner",
    "zigzag",
    "tee",
    "asterisk",
    "wave",
    "diamond_outline",
)
REGIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
MAX_CLASSES = len(SHAPE_TYPES) * len(REGIONS)  # 64
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_MAX_NATIVE = 64  # larger img_size: render at <= 64 px and let the transform upsample
_CACHE_BYTES = 1 << 30  # without cache_dir, a larger split is rendered on every read
RENDER_VERSION = 1  # part of the cache file's name: bump it when render() changes
_TILT = math.radians(15)  # rotation jitter; small enough that plus != x, square != diamond


def class_names(num_classes: int) -> list[str]:
    """`"ring@top-left"`-style names of the first `num_classes` classes."""
    return [f"{SHAPE_TYPES[c // 4]}@{REGIONS[c % 4]}" for c in range(num_classes)]


def native_size(img_size: tuple[int, int]) -> tuple[int, int]:
    """The render size: img_size, scaled down so that the longer side is <= 64 px."""
    h, w = img_size
    scale = min(1.0, _MAX_NATIVE / max(h, w))
    return max(4, round(h * scale)), max(4, round(w * scale))


class ShapesDataset(Dataset):
    """`num_images` images of `num_classes` classes (balanced: label = index % classes).

    Items are `(PIL RGB image of size img_size (or its <= 64 px version), int label)`;
    `labels` holds every label without rendering anything.
    """

    def __init__(
        self,
        num_images: int,
        num_classes: int,
        img_size: tuple[int, int],
        seed: int,
        split: str = "train",
        cache_dir: str | Path | None = None,
    ) -> None:
        if not 1 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"shapes has 1..{MAX_CLASSES} classes, not {num_classes}")
        self.num_classes = num_classes
        self.size = native_size(img_size)
        self.seed = seed
        self.split_id = SPLIT_IDS[split]
        self.labels = np.arange(num_images, dtype=np.int64) % num_classes
        h, w = self.size
        self.cache_file = None
        if cache_dir is not None:
            what = f"{split}-seed{seed}-{num_classes}c-{h}x{w}-{num_images}"
            self.cache_file = Path(cache_dir) / f"shapes-v{RENDER_VERSION}-{what}.npy"
            if num_images and not self._cached_file_ok():
                self._render_to_file()
        self._pixels: np.ndarray | None = None  # the cache file, mapped on first read
        small = num_images * h * w * 3 <= _CACHE_BYTES
        self._made: dict[int, np.ndarray] | None = {} if small and cache_dir is None else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}  # a worker maps the file itself

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = int(index)
        label = int(self.labels[index])
        if self.cache_file is not None:
            if self._pixels is None:
                self._pixels = np.load(self.cache_file, mmap_mode="r")
            return Image.fromarray(np.array(self._pixels[index])), label
        pixels = None if self._made is None else self._made.get(index)
        if pixels is None:
            pixels = self.render(index)
            if self._made is not None:
                self._made[index] = pixels
        return Image.fromarray(pixels), label

    def render(self, index: int) -> np.ndarray:
        """Image `index` as uint8 (H, W, 3)."""
        label = int(self.labels[index])
        rng = np.random.default_rng([self.seed % 2**64, self.split_id, int(index)])
        return np.asarray(render(label // 4, label % 4, self.size, rng))

    def _cached_file_ok(self) -> bool:
        try:
            pixels = np.load(self.cache_file, mmap_mode="r")
        except (OSError, ValueError):  # missing, or damaged: rendered again
            return False
        return pixels.shape == (len(self.labels), *self.size, 3) and pixels.dtype == np.uint8

    def _render_to_file(self) -> None:
        """Render every image into the cache file, on every CPU core, atomically: a
        concurrent run or a crash never leaves a partial file under the final name."""
        import logging
        from concurrent.futures import ProcessPoolExecutor

        n = len(self.labels)
        logging.getLogger("vitexp").info(
            "shapes: rendering %d images once into %s", n, self.cache_file
        )
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        part = self.cache_file.with_name(f"{self.cache_file.stem}.{os.getpid()}.part.npy")
        np.lib.format.open_memmap(part, mode="w+", dtype=np.uint8, shape=(n, *self.size, 3))
        workers = min(os.cpu_count() or 1, max(1, n // 2000))
        bounds = np.linspace(0, n, workers + 1).astype(int)
        try:
            if workers == 1:
                self._render_range(part, 0, n)
            else:
                with ProcessPoolExecutor(workers) as pool:
                    chunks = zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
                    list(pool.map(self._render_range, [part] * workers, *zip(*chunks, strict=True)))
            os.replace(part, self.cache_file)
        finally:
            part.unlink(missing_ok=True)

    def _render_range(self, part: Path, start: int, stop: int) -> None:
        pixels = np.load(part, mmap_mode="r+")
        for i in range(start, stop):
            pixels[i] = self.render(i)
        pixels.flush()


def render(shape: int, region: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One image (H, W) = size with shape type `shape` inside quadrant `region`."""
    h, w = size
    ss = max(1, min(4, 256 // max(h, w)))  # supersampling factor: draw big, box-downsample
    u = rng.random(51)  # every parameter comes from this one draw (numpy calls are slow)
    grey = u[0] < 1 / 3
    cols = (u[27:51].reshape(8, 3) * 256).astype(np.int64)  # bg, 4 foreground tries, 3 specks
    if grey:
        cols[:] = cols[:, :1]
    gap = np.abs(cols[1:5] @ _LUMA - cols[0] @ _LUMA)  # luminance contrast of the 4 tries
    good = gap >= 40 + 120 * u[1]  # the first try with enough contrast, else the best one
    fg = 1 + int(np.argmax(good) if good.any() else np.argmax(gap))
    colours = [tuple(c) for c in cols.tolist()]
    canvas = Image.new("RGB", (w * ss, h * ss), colours[0])
    draw = ImageDraw.Draw(canvas)

    for k in range(int(u[2] * 4)):  # 0-3 specks of clutter, anywhere, too small to be a shape
        x, y = u[3 + 2 * k] * w * ss, u[4 + 2 * k] * h * ss
        rad = (0.5 + u[9 + k]) * ss
        draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=colours[5 + k])

    rh, rw = h / 2, w / 2  # quadrant size (native px)
    side = min(rh, rw)
    radius = side * (0.28 + 0.2 * u[12])  # circumradius: the shape spans 56-96% of the quadrant
    width = max(1, round(side * (0.06 + 0.1 * u[13]) * ss))  # stroke width: 1-3 px at 32 px
    cx = (region % 2) * rw + radius + (rw - 2 * radius) * u[14]
    cy = (region // 2) * rh + radius + (rh - 2 * radius) * u[15]
    _SHAPES[shape](draw, cx * ss, cy * ss, radius * ss, width, colours[fg], u[20:])

    img = np.asarray(canvas.reduce(ss) if ss > 1 else canvas, dtype=np.float32)  # (H, W, 3)
    # shading: a random-phase low-frequency cosine, whose distribution is the same at every
    # position (no quadrant gets a give-away background); then pixel noise
    # A cos(ay + ax) = A (cos ay cos ax - sin ay sin ax), as outer products (speed)
    ay = 2 * np.pi * (int(u[16] * 2) * np.arange(h) / h + u[19])  # (H,)
    ax = 2 * np.pi * int(u[17] * 2) * np.arange(w) / w  # (W,)
    shade = (40 * u[18]) * (np.outer(np.cos(ay), np.cos(ax)) - np.outer(np.sin(ay), np.sin(ax)))
    noise = rng.random((h, w, 1 if grey else 3), dtype=np.float32) - np.float32(0.5)
    img += shade[:, :, None].astype(np.float32) + noise * np.float32(7 + 50 * u[26])  # sd 2-16
    return Image.fromarray(np.clip(img, 0, 255, out=img).astype(np.uint8))


_LUMA = np.array([0.299, 0.587, 0.114])


# --- the shape types ---------------------------------------------------------------------
# Each is drawn around (cx, cy) within radius r (supersampled px) with stroke width wd;
# p holds 6 uniforms: tilt, orientation, x/y aspect, and two for the arc.
def _ellipse(filled: bool):
    def draw(d, cx, cy, r, wd, fg, p):
        rx, ry = r * (0.75 + 0.25 * p[2]), r * (0.75 + 0.25 * p[3])
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        if filled:
            d.ellipse(box, fill=fg)
        else:
            d.ellipse(box, outline=fg, width=wd)

    return draw


def _arc(d, cx, cy, r, wd, fg, p):
    gap = 60 + 60 * p[4]  # an open C whose gap faces any direction
    start = 360 * p[5]
    d.arc((cx - r, cy - r, cx + r, cy + r), start + gap / 2, start + 360 - gap / 2, fg, wd)


def _figure(kind: str, turns: int, *parts):
    """Polygons ("fill", "outline") or open polylines ("lines") given in unit-circle
    coordinates, stretched by the aspect, turned by one of `turns` right angles plus tilt."""

    def draw(d, cx, cy, r, wd, fg, p):
        a = (2 * p[0] - 1) * _TILT + math.pi / 2 * int(p[1] * turns)
        c, s = math.cos(a), math.sin(a)
        ax, ay = r * (0.75 + 0.25 * p[2]), r * (0.75 + 0.25 * p[3])
        for part in parts:
            pts = [(cx + ax * x * c - ay * y * s, cy + ax * x * s + ay * y * c) for x, y in part]
            if kind == "fill":
                d.polygon(pts, fill=fg)
            elif kind == "outline":
                d.line([*pts, pts[0], pts[1]], fill=fg, width=wd, joint="curve")
            else:
                d.line(pts, fill=fg, width=wd, joint="curve")

    return draw


_SQUARE = ((-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7))
_TRIANGLE = ((0.0, -1.0), (0.87, 0.5), (-0.87, 0.5))
_DIAMOND = ((0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0))
_SPOKE = 0.71  # cos 45 deg
_WAVE = tuple((-0.9 + 1.8 * k / 16, 0.4 * math.sin(3 * math.pi * k / 16)) for k in range(17))
_ZIGZAG = ((-0.85, -0.45), (-0.42, 0.45), (0.0, -0.45), (0.42, 0.45), (0.85, -0.45))
_ASTERISK = tuple(
    ((-math.cos(a), -math.sin(a)), (math.cos(a), math.sin(a)))
    for a in (math.pi / 2, math.pi / 2 + math.pi / 3, math.pi / 2 + 2 * math.pi / 3)
)

_SHAPES = (  # in SHAPE_TYPES order
    _ellipse(filled=True),
    _ellipse(filled=False),
    _figure("fill", 1, _SQUARE),
    _figure("outline", 1, _SQUARE),
    _figure("fill", 4, _TRIANGLE),
    _figure("outline", 4, _TRIANGLE),
    _figure("lines", 1, ((-1, 0), (1, 0)), ((0, -1), (0, 1))),
    _figure(
        "lines", 1, ((-_SPOKE, -_SPOKE), (_SPOKE, _SPOKE)), ((-_SPOKE, _SPOKE), (_SPOKE, -_SPOKE))
    ),
    _figure("lines", 2, ((-0.75, -0.45), (0.75, -0.45)), ((-0.75, 0.45), (0.75, 0.45))),
    _arc,
    _figure("lines", 4, ((-0.6, -0.8), (-0.6, 0.6), (0.8, 0.6))),
    _figure("lines", 2, _ZIGZAG),
    _figure("lines", 4, ((-0.8, -0.6), (0.8, -0.6)), ((0.0, -0.6), (0.0, 0.8))),
    _figure("lines", 1, *_ASTERISK),
    _figure("lines", 2, _WAVE),
    _figure("outline", 1, _DIAMOND),
)
assert len(_SHAPES) == len(SHAPE_TYPES)
