"""Drawing the four views with matplotlib: each function returns a `Figure` (no pyplot, so no
global state; `png_bytes` renders it with the Agg canvas)."""

from __future__ import annotations

import io
import math
import textwrap

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import text_to_path

from vitexp.analysis.viz.compute import similarity_mosaic, unit_range

DPI = 110


def png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG with the Agg canvas."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def fit_title(title: str, fig: Figure, fontsize: float) -> str:
    """`title` as it is if every line fits the figure's width, else re-wrapped (textwrap) into
    as few lines of even length as fit, measured in the title's font."""
    room = 0.92 * fig.get_figwidth() * 72  # points, less a margin at each edge
    font = FontProperties(size=fontsize)

    def widest(text: str) -> float:
        return max(
            text_to_path.get_text_width_height_descent(line, font, False)[0]
            for line in text.splitlines()
        )

    if widest(title) <= room:
        return title
    words, chars = " ".join(title.split()), max(map(len, title.splitlines()))
    while widest(textwrap.fill(words, chars)) > room and chars > 20:
        chars -= 1
    lines = len(textwrap.wrap(words, chars))
    while chars > 20 and len(textwrap.wrap(words, chars - 1)) == lines:  # balance the lines
        chars -= 1
    return textwrap.fill(words, chars)


def _suptitle(fig: Figure, title: str, fontsize: float) -> None:
    fig.suptitle(fit_title(title, fig, fontsize), fontsize=fontsize)


def _show_image(ax, image: np.ndarray) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    ax.set_axis_off()


def draw_attention(
    images: list[np.ndarray], heat: torch.Tensor, names: list[str], title: str
) -> Figure:
    """One row per image: the input, the map blended over it, and the image weighted by it."""
    aspect = images[0].shape[0] / images[0].shape[1]  # rows as tall as the images need
    fig = Figure(figsize=(9.6, (2.9 * aspect + 0.3) * len(images) + 0.6), layout="constrained")
    axes = fig.subplots(len(images), 3, squeeze=False)
    last = None
    for row, (image, h, name) in enumerate(zip(images, heat, names, strict=True)):
        h = unit_range(h).numpy()  # min-max per image: the map's shape, not its scale
        ax_in, ax_map, ax_mask = axes[row]
        _show_image(ax_in, image)
        ax_in.set_title(name, fontsize=9)
        _show_image(ax_map, image)
        last = ax_map.imshow(h, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax_map.set_title("attention map (overlay)", fontsize=9)
        weight = h if image.ndim == 2 else h[..., None]
        _show_image(ax_mask, (image * weight).astype(np.uint8))
        ax_mask.set_title("image x attention map", fontsize=9)
    fig.colorbar(last, ax=axes, shrink=0.6, label="rollout (min-max per image)")
    _suptitle(fig, title, fontsize=10)
    return fig


def draw_filters(pcs: torch.Tensor, ratio: torch.Tensor, title: str, cols: int = 7) -> Figure:
    """Principal components as small images (RGB when there are 3 channels), each scaled to
    [0, 1] on its own, in the paper's 4 x 7 layout."""
    k = pcs.shape[0]
    cols = min(cols, k)
    rows = math.ceil(k / cols)
    fig = Figure(figsize=(1.25 * cols + 0.4, 1.35 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= k:
            continue
        pc = unit_range(pcs[i])  # (C, kh, kw)
        if pc.shape[0] == 3:
            ax.imshow(pc.permute(1, 2, 0).numpy(), interpolation="nearest")
        else:  # grey (1 channel) or the channel mean
            ax.imshow(pc.mean(0).numpy(), cmap="gray", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"PC{i + 1} ({100 * ratio[i]:.1f}%)", fontsize=7)
    _suptitle(fig, title, fontsize=10)
    return fig


def _tile_ticks(ax, axis: str, n: int, gap: int) -> None:
    step = max(1, math.ceil(n / 12))
    centres = [i * (n + gap) + (n - 1) / 2 for i in range(0, n, step)]
    labels = [str(i + 1) for i in range(0, n, step)]
    if axis == "x":
        ax.set_xticks(centres, labels, fontsize=7)
    else:
        ax.set_yticks(centres, labels, fontsize=7)


def _mosaic_side(grid_size: tuple[int, int]) -> tuple[float, float]:
    """Width and height (inches) of one Figure-7 mosaic: big enough that each tile pixel
    (and each 1-pixel gap) spans >= ~3 screen pixels."""
    rows, cols = grid_size
    side = min(10.0, max(4.6, 3.0 * max(rows, cols) ** 2 / DPI))
    return (side, side * rows / cols) if cols >= rows else (side * cols / rows, side)


def _draw_mosaic(ax, sim: torch.Tensor, grid_size: tuple[int, int], label: str, gap: int = 1):
    rows, cols = grid_size
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")  # the gaps
    mosaic = np.ma.masked_invalid(similarity_mosaic(sim, grid_size, gap))
    image = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    _tile_ticks(ax, "x", cols, gap)
    _tile_ticks(ax, "y", rows, gap)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(label, fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return image


def draw_pos_similarity(
    panels: list[tuple[str, torch.Tensor]],
    grid_size: tuple[int, int],
    title: str,
    label: str = "cosine similarity",
    max_cols: int = 4,
) -> Figure:
    """Figure 7 (centre): per panel, a rows x cols grid of small rows x cols maps; panels
    side by side, wrapped after `max_cols`."""
    width, height = _mosaic_side(grid_size)
    cols = min(len(panels), max_cols)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(width * cols + 1.2, height * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    last = None
    for ax, (name, sim) in zip(axes, panels, strict=False):
        last = _draw_mosaic(ax, sim, grid_size, name)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.colorbar(last, ax=list(axes[: len(panels)]), shrink=0.8, label=label)
    _suptitle(fig, title, fontsize=10)
    return fig


def draw_offset_bias(tables: torch.Tensor, title: str, max_cols: int = 6) -> Figure:
    """A 2-D relative bias: per head, its (2H-1) x (2W-1) image of offsets query - key,
    offset 0 at the centre; one symmetric colour scale for all heads."""
    heads, h, w = tables.shape
    cols = min(heads, max_cols)
    rows = math.ceil(heads / cols)
    side = min(3.2, max(2.0, 0.12 * max(h, w)))
    fig = Figure(figsize=(side * cols + 1.4, side * h / w * rows + 1.3), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    bound = max(float(tables.abs().max()), 1e-12)
    extent = (-(w // 2) - 0.5, w // 2 + 0.5, h // 2 + 0.5, -(h // 2) - 0.5)
    style = dict(extent=extent, interpolation="nearest")
    image = None
    for i, ax in enumerate(axes):
        if i >= heads:
            ax.set_visible(False)
            continue
        image = ax.imshow(tables[i].numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, **style)
        ax.set_title(f"head {i}", fontsize=8)
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("row offset", fontsize=8)
        if i >= heads - cols:
            ax.set_xlabel("column offset", fontsize=8)
    fig.colorbar(image, ax=list(axes[:heads]), shrink=0.8, label="bias (query - key offset)")
    _suptitle(fig, title, fontsize=9)
    return fig


def draw_conditional(
    norm: torch.Tensor, sim: torch.Tensor, grid_size: tuple[int, int], title: str
) -> Figure:
    """CPVT's generator: the norm of what it adds per patch (left) and the Figure-7 mosaic
    of the cosine similarity of those additions (right)."""
    width, height = _mosaic_side(grid_size)
    fig = Figure(figsize=(2 * width + 2.4, height + 1.2), layout="constrained")
    ax_norm, ax_sim = fig.subplots(1, 2)
    image = ax_norm.imshow(norm.numpy(), cmap="magma", vmin=0, interpolation="nearest")
    rows, cols = grid_size
    ax_norm.set_xticks(range(0, cols, max(1, math.ceil(cols / 12))))
    ax_norm.set_yticks(range(0, rows, max(1, math.ceil(rows / 12))))
    ax_norm.xaxis.set_major_formatter(lambda v, _: f"{v + 1:.0f}")  # 1-based, as the mosaic
    ax_norm.yaxis.set_major_formatter(lambda v, _: f"{v + 1:.0f}")
    ax_norm.tick_params(labelsize=7)
    ax_norm.set_xlabel("input patch column")
    ax_norm.set_ylabel("input patch row")
    ax_norm.set_title("norm of the addition, per patch", fontsize=9)
    fig.colorbar(image, ax=ax_norm, shrink=0.8, label="L2 norm")
    last = _draw_mosaic(ax_sim, sim, grid_size, "cosine similarity of the additions")
    fig.colorbar(last, ax=ax_sim, shrink=0.8, label="cosine similarity")
    _suptitle(fig, title, fontsize=10)
    return fig


def draw_relative_similarity(sim: torch.Tensor, title: str) -> Figure:
    """Cosine similarity of a relative-offset table, offsets -(N-1) .. N-1 on both axes."""
    half = (sim.shape[0] - 1) // 2
    fig = Figure(figsize=(6.4, 5.6), layout="constrained")
    ax = fig.subplots()
    extent = (-half - 0.5, half + 0.5, half + 0.5, -half - 0.5)
    image = ax.imshow(sim.numpy(), cmap="viridis", vmin=-1, vmax=1, extent=extent)
    ax.set_xlabel("offset k - q (key - query, row-major patch index)")
    ax.set_ylabel("offset k - q")
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity")
    _suptitle(fig, title, fontsize=9)
    return fig


def draw_message(text: str) -> Figure:
    """A figure that only says something (e.g. the model has no position embedding)."""
    fig = Figure(figsize=(6.4, 2.0))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, wrap=True)
    return fig


def draw_attention_distance(distance: torch.Tensor, title: str) -> Figure:
    """Figure 7 (right): one dot per head, mean attention distance against layer depth."""
    layers, heads = distance.shape
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    colours = [f"C{h % 10}" for h in range(heads)]
    for h in range(heads):
        ax.scatter(
            np.arange(layers), distance[:, h].numpy(), s=22, color=colours[h], label=f"head {h}"
        )
    ax.plot(np.arange(layers), distance.mean(1).numpy(), "k--", lw=1, label="mean of heads")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(np.arange(0, layers, max(1, math.ceil(layers / 12))))
    ax.set_ylim(bottom=0, top=max(1.0, float(distance.max()) * 1.1))
    ax.grid(alpha=0.3)
    if heads <= 16:
        ax.legend(fontsize=7, ncols=2, loc="lower right")
    ax.set_title(fit_title(title, fig, fontsize=9), fontsize=9)
    return fig
