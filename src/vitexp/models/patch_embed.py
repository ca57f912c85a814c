"""Patch embedding: cut the image into P x P patches and project each one to width D.

The paper reshapes the image into N = HW / P^2 flattened patches and maps each with a
shared linear layer E; a P x P convolution with stride P is the same map. A stride S < P
makes patches overlap (the lecture allows it), giving (H - P) / S + 1 patches per column.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Size2d = tuple[int, int]


def to_2tuple(value: int | Sequence[int], name: str) -> Size2d:
    """`16` -> (16, 16); `(384, 512)` stays. Rejects anything that is not one or two ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name}={value!r}: use an int or [height, width]")


def patch_grid(img_size: Size2d, patch_size: Size2d, stride: Size2d) -> Size2d:
    """Rows and columns of patches; raises if the patches do not tile the image exactly."""
    grid = []
    for axis, size, p, s in zip(("height", "width"), img_size, patch_size, stride, strict=True):
        if p < 1 or s < 1:
            raise ValueError(f"patch_size={p} and patch_stride={s} must be >= 1")
        if s > p:
            raise ValueError(
                f"patch_stride={s} > patch_size={p} would skip pixels; use a stride <= patch size"
            )
        if size < p or (size - p) % s != 0:
            raise ValueError(
                f"image {axis} {size} does not tile into patches of {p} with stride {s}: "
                f"need {axis} = {p} + k*{s} (e.g. {p + max(0, (size - p) // s) * s} "
                f"or {p + max(1, (size - p) // s + 1) * s})"
            )
        grid.append((size - p) // s + 1)
    return (grid[0], grid[1])


def check_input_size(x: torch.Tensor, img_size: Size2d) -> None:
    """Position embeddings are built for one grid: say so instead of failing on a shape."""
    if tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(
            f"input is {tuple(x.shape[-2:])} but the model is built for {tuple(img_size)}; "
            "call model.resize(img_size) first"
        )


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, N, D), N = rows x cols in row-major order."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        patch_stride: int | Sequence[int] | None = None,
        in_chans: int = 3,
        embed_dim: int = 768,
    ):
        super().__init__()
        self.patch_size = to_2tuple(patch_size, "patch_size")
        self.stride = (
            self.patch_size if patch_stride is None else to_2tuple(patch_stride, "patch_stride")
        )
        self.img_size = to_2tuple(img_size, "img_size")
        self.grid_size = patch_grid(self.img_size, self.patch_size, self.stride)
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.stride)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def set_img_size(self, img_size: int | Sequence[int]) -> None:
        """Accept a new input resolution (the weights do not depend on it)."""
        img_size = to_2tuple(img_size, "img_size")
        self.grid_size = patch_grid(img_size, self.patch_size, self.stride)
        self.img_size = img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.img_size)
        x = self.proj(x)  # (B, D, rows, cols)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)
