"""Patch embedding: cut the image into P x P patches and project each one to width D.

The paper reshapes the image into N = HW / P^2 flattened patches and maps each with a
shared linear layer E; a P x P convolution with stride P is the same map. A stride S < P
makes patches overlap (the lecture allows it), giving (H - P) / S + 1 patches per column.

`resample_patch_embed` carries a P x P kernel to another patch size the FlexiViT way (Beyer
et al. 2023, "FlexiViT: One Model for All Patch Sizes", section 3.4), as timm's function
of that name does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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


def resample_patch_embed(
    weight: torch.Tensor,
    new_size: int | Sequence[int],
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """A (D, C, P, P) patch-projection kernel resampled to (D, C, P', P') so that a patch
    resized to P' x P' by the same interpolation gives the same token (FlexiViT, sec. 3.4).

    Why not resize the kernel like an image: a token is <x, w>; resizing the patch is linear,
    resize(x) = R x (R: P'^2 x P^2), and resizing x and w alike changes the token (by the
    area ratio and more). FlexiViT asks instead for <x, w> = <R x, w'> for every x, i.e.
    R^T w' = w, and takes the least-squares solution w' = pinv(R^T) w. Upsampling (P' > P)
    solves it exactly: the old token comes back from the upsampled patch; downsampling
    loses detail and can only match it best on average.

    Args:
        weight: the kernel, (D, C, P_h, P_w).
        new_size: P' or (P'_h, P'_w).
        interpolation: how patches are resized (`F.interpolate`'s mode).
        antialias: the resize's anti-aliasing (bilinear and bicubic only).

    Returns:
        The kernel at the new size, in `weight`'s dtype and on its device (computed in
        float64).
    """
    old_size = tuple(weight.shape[-2:])
    new_size = to_2tuple(new_size, "patch_size")
    if old_size == new_size:
        return weight
    # R's columns: each of the P^2 one-pixel basis patches, resized
    n_old = old_size[0] * old_size[1]
    basis = torch.eye(n_old, dtype=torch.float64, device=weight.device)
    basis = basis.reshape(n_old, 1, *old_size)
    kwargs = {} if interpolation == "nearest" else {"antialias": antialias, "align_corners": False}
    resized = F.interpolate(basis, size=new_size, mode=interpolation, **kwargs)
    resize_mat = resized.reshape(n_old, -1).T  # R: (P'^2, P^2)
    d, c = weight.shape[:2]
    kernel = weight.reshape(d, c, n_old).to(torch.float64)  # (D, C, P^2)
    new = kernel @ torch.linalg.pinv(resize_mat)  # w'^T = w^T pinv(R): (D, C, P'^2)
    return new.reshape(d, c, *new_size).to(weight.dtype)


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

    @torch.no_grad()
    def set_patch_size(
        self, patch_size: int | Sequence[int], img_size: int | Sequence[int] | None = None
    ) -> None:
        """Cut the image into patches of another size: the projection kernel is resampled
        (`resample_patch_embed`, the bias kept), the stride follows the patch size. The
        image (`img_size`, default the current one) must tile into the new patches.

        Only non-overlapping patches: with stride < patch size the token no longer sees
        one resized patch, and the pseudo-inverse that defines the new kernel says nothing.
        """
        patch_size = to_2tuple(patch_size, "patch_size")
        if self.stride != self.patch_size:
            raise ValueError(
                f"patch_stride={self.stride} differs from patch_size={self.patch_size}: "
                "overlapping patches cannot be resampled to another patch size (FlexiViT "
                "resamples non-overlapping ones only)"
            )
        img_size = self.img_size if img_size is None else to_2tuple(img_size, "img_size")
        grid_size = patch_grid(img_size, patch_size, patch_size)  # raises if it does not tile
        weight = self.proj.weight
        self.proj.weight = nn.Parameter(
            resample_patch_embed(weight, patch_size), requires_grad=weight.requires_grad
        )
        self.proj.kernel_size = self.proj.stride = patch_size
        self.patch_size = self.stride = patch_size
        self.img_size, self.grid_size = img_size, grid_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.img_size)
        x = self.proj(x)  # (B, D, rows, cols)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)
