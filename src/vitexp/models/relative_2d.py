"""2-D relative position bias (Swin, BEiT): one learned scalar per head for every 2-D offset
between a query patch and a key patch, added to the attention logits.

A (H, W) grid has (2H-1)(2W-1) offsets (dy, dx). The class token is not on the grid: as in
BEiT, three more entries hold its bias to a patch, a patch's bias to it, and its bias to
itself. The table is per block or, with `pos_embed.shared=true`, one table for every block
(BEiT's shared relative bias). The lookup is timm's `RelPosBias`, entry for entry.

At another resolution the offset table is resampled as an image of (2H-1) x (2W-1) offsets
per head (as BEiT fine-tunes), the class-token entries kept.
"""

from __future__ import annotations

import torch
from torch import nn

from vitexp.models.patch_embed import Size2d
from vitexp.models.pos_embed import resample_table_2d

NUM_SPECIAL = 3  # class -> patch, patch -> class, class -> class


def relative_index_2d(grid_size: Size2d, num_prefix_tokens: int) -> torch.Tensor:
    """(T, T) index of each (query, key) pair into the table: the offset query - key of the
    two patches, row-major over (2H-1, 2W-1); then the class-token entries."""
    rows, cols = grid_size
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    y, x = y.flatten(), x.flatten()
    dy = y[:, None] - y[None, :] + rows - 1
    dx = x[:, None] - x[None, :] + cols - 1
    patches = dy * (2 * cols - 1) + dx
    if not num_prefix_tokens:
        return patches
    p, n = num_prefix_tokens, rows * cols
    offsets = (2 * rows - 1) * (2 * cols - 1)
    index = torch.empty(p + n, p + n, dtype=torch.long)
    index[p:, p:] = patches
    index[:p, :] = offsets  # class -> any
    index[:, :p] = offsets + 1  # any -> class
    index[:p, :p] = offsets + 2  # class -> class
    return index


class RelativePositionBias2D(nn.Module):
    """`forward(q, scale)` -> the (1, heads, Tq, T) bias of the first Tq queries (the bias
    does not depend on the query's content; the signature is the 1-D table's)."""

    def __init__(
        self, grid_size: Size2d, num_prefix_tokens: int, num_heads: int, init_std: float = 0.02
    ):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        offsets = (2 * grid_size[0] - 1) * (2 * grid_size[1] - 1)
        special = NUM_SPECIAL if num_prefix_tokens else 0
        self.table = nn.Parameter(torch.empty(offsets + special, num_heads))
        nn.init.trunc_normal_(self.table, std=init_std)
        self.register_buffer("index", relative_index_2d(grid_size, num_prefix_tokens), False)

    def bias(self) -> torch.Tensor:
        """(1, heads, T, T)."""
        t = self.index.shape[0]
        return self.table[self.index.flatten()].reshape(t, t, -1).permute(2, 0, 1)[None]

    def forward(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        return self.bias()[:, :, : q.shape[2]].to(q.dtype)

    @torch.no_grad()
    def resize(self, grid_size: Size2d, interpolation: str, antialias: bool) -> None:
        if tuple(grid_size) == self.grid_size:
            return
        old = (2 * self.grid_size[0] - 1, 2 * self.grid_size[1] - 1)
        new = (2 * grid_size[0] - 1, 2 * grid_size[1] - 1)
        offsets, special = self.table[: old[0] * old[1]], self.table[old[0] * old[1] :]
        offsets = resample_table_2d(offsets, old, new, interpolation, antialias)
        self.table = nn.Parameter(torch.cat([offsets, special]).contiguous())
        self.grid_size = tuple(grid_size)
        self.index = relative_index_2d(grid_size, self.num_prefix_tokens).to(self.index.device)
