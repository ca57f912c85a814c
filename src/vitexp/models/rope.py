"""2-D rotary position embeddings (RoPE-ViT, Heo et al., ECCV 2024), applied to the queries
and keys of every block.

A rotary embedding turns each pair of a head's channels (2i, 2i+1) by an angle that depends
on the token's position, so that the dot product of a query and a key depends on their
offset only. In 2-D the angle of pair i at patch (row y, column x) is

    axial:  x * f_i for the first half of the pairs, y * f_i for the second half,
            with fixed frequencies f_i = 1 / theta^(i / (head_dim / 4)), theta 100;
    mixed:  x * fx_i + y * fy_i, with frequencies (fx, fy) learned per layer and head,
            started at random directions with magnitudes 1 / theta^(4i / head_dim), theta 10.

The class token is not on the grid and is not rotated. The pairs are interleaved
([x0, x1] is one pair), as in the paper's code and timm's `RotaryEmbeddingCat` /
`RotaryEmbeddingMixed` (`rope_grid_indexing='xy'`), whose weights therefore load unchanged.

At another resolution (`resize`), the positions are the new grid's integer indices
(`extrapolate`: a patch keeps its pixel scale, the model sees offsets it never saw) or
those indices squeezed into the training grid's range (`interpolate`: the offsets stay in
the trained range, a patch covers less of it), EVA's `ref_feat_shape` scheme.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from vitexp.models.patch_embed import Size2d

ROPE_POSITIONS = ("extrapolate", "interpolate")


def check_positions(positions: str) -> str:
    """`pos_embed.rope_positions` is one of ROPE_POSITIONS, else a ValueError naming it."""
    if positions not in ROPE_POSITIONS:
        raise ValueError(
            f"pos_embed.rope_positions={positions!r} is not one of {', '.join(ROPE_POSITIONS)}"
        )
    return positions


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]: each pair turned by 90 degrees."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., N, head_dim) by the angles whose sin and cos (..., N, head_dim / 2)
    are given, pair by pair; computed in the angles' precision, returned in x's dtype."""
    sin = sin.repeat_interleave(2, dim=-1)
    cos = cos.repeat_interleave(2, dim=-1)
    return (x * cos + rotate_pairs(x) * sin).to(x.dtype)


class Rotary2D(nn.Module, ABC):
    """What both kinds share: the grid, its coordinates and the resize policy."""

    def __init__(self, grid_size: Size2d, head_dim: int, positions: str = "extrapolate"):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.positions = check_positions(positions)
        self.train_grid = tuple(grid_size)  # the grid the positions were learned on
        self.grid_size = tuple(grid_size)

    def coords(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Column (x) and row (y) of every patch in row-major order, float32 (N,) each."""
        rows, cols = self.grid_size
        y = torch.arange(rows, device=device, dtype=torch.float32)
        x = torch.arange(cols, device=device, dtype=torch.float32)
        if self.positions == "interpolate":
            y = y * (self.train_grid[0] / rows)
            x = x * (self.train_grid[1] / cols)
        y, x = torch.meshgrid(y, x, indexing="ij")
        return x.flatten(), y.flatten()

    def resize(self, grid_size: Size2d, positions: str | None = None) -> None:
        """Follow a new patch grid; the frequencies do not change."""
        if positions is not None:
            self.positions = check_positions(positions)
        self.grid_size = tuple(grid_size)

    @abstractmethod
    def angles(self, layer: int, device: torch.device) -> torch.Tensor:
        """(heads or 1, N, head_dim / 2) angle of each channel pair of each patch."""

    def forward(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos) of block `layer`'s angles, float32."""
        angles = self.angles(layer, device)
        return angles.sin(), angles.cos()


class RotaryAxial(Rotary2D):
    """RoPE-Axial: fixed frequencies, x on the first half of the pairs and y on the second;
    no parameters, the same in every block and head."""

    def __init__(self, grid_size: Size2d, head_dim: int, theta: float = 100.0, **kw):
        super().__init__(grid_size, head_dim, **kw)
        self.theta = theta
        n = head_dim // 4
        bands = 1.0 / theta ** (torch.arange(n, dtype=torch.float32) / n)
        self.register_buffer("bands", bands, persistent=False)

    def angles(self, layer: int, device: torch.device) -> torch.Tensor:
        x, y = self.coords(device)
        bands = self.bands.to(device)
        return torch.cat([x[:, None] * bands, y[:, None] * bands], dim=-1)[None]


class RotaryMixed(Rotary2D):
    """RoPE-Mixed: learned frequencies `freqs` (2, depth, heads, head_dim / 2) = (fx, fy) per
    layer and head, so a head can mix the axes (attend along diagonals). Kept out of weight
    decay (`VisionTransformer.no_weight_decay`)."""

    def __init__(
        self, grid_size: Size2d, head_dim: int, depth: int, num_heads: int, theta=10.0, **kw
    ):
        super().__init__(grid_size, head_dim, **kw)
        self.theta = theta
        self.freqs = nn.Parameter(self.init_freqs(head_dim, depth, num_heads, theta))

    @staticmethod
    def init_freqs(head_dim: int, depth: int, num_heads: int, theta: float) -> torch.Tensor:
        """Magnitudes 1/theta^(4i/head_dim), each head's in two perpendicular directions at a
        random angle (the paper's init)."""
        magnitude = 1.0 / theta ** (torch.arange(0, head_dim, 4, dtype=torch.float32) / head_dim)
        phi = torch.rand(depth, num_heads, 1) * 2 * math.pi
        fx = torch.cat([magnitude * phi.cos(), magnitude * (phi + math.pi / 2).cos()], dim=-1)
        fy = torch.cat([magnitude * phi.sin(), magnitude * (phi + math.pi / 2).sin()], dim=-1)
        return torch.stack([fx, fy])

    def angles(self, layer: int, device: torch.device) -> torch.Tensor:
        x, y = self.coords(device)
        fx, fy = self.freqs[0, layer].float(), self.freqs[1, layer].float()  # (heads, pairs)
        return x[None, :, None] * fx[:, None, :] + y[None, :, None] * fy[:, None, :]
