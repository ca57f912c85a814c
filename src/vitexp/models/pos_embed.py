"""Position embeddings of the ViT paper (appendix D.4, Table 8) and their resampling.

Kinds (`PosEmbedSpec.kind`):
  none        no position information: the encoder sees a set of patches.
  learned_1d  one learned vector per sequence position (class token included), the paper's
              default, resampled on the 2-D grid when the resolution changes.
  learned_2d  a learned X table and a learned Y table of width D/2 each; a patch at
              (row, col) gets concat(X[col], Y[row]); the class token has its own vector.
  relative    1-D relative attention: a learned vector per offset between query and key
              positions, matched against the query as extra keys; the logits are a bias
              on the content logits before the softmax, in every layer.
  sincos_2d   fixed 2-D sin-cos (Beyer et al. 2022, "Better plain ViT baselines"): not in the
              paper's table, a parameter-free baseline.

After the paper (the encodings that differ away from the training resolution):
  rope_axial  2-D rotary embedding of queries and keys in every block, fixed frequencies,
              x on half of each head's channel pairs and y on the other half (`rope.py`).
  rope_mixed  2-D rotary embedding with frequencies learned per layer and head (RoPE-ViT).
  rope_axial_ape, rope_mixed_ape
              the same, plus a learned 1-D table added at the stem (timm's `_ape` models).
  relative_2d a learned bias per head for every 2-D offset between patches (Swin, BEiT),
              one table per block or, with `shared=true`, one for all (`relative_2d.py`).
  conditional CPVT's position encoding generator: a depthwise 3x3 convolution over the token
              grid, with a residual, after the first block; no table, any grid.

Placements (`PosEmbedSpec.placement`): `stem` adds one table to the input tokens;
`every_layer` gives each block its own table, added to the block's input; `every_layer_shared`
adds one table at every block's input. `none` and `relative` exist only at `stem`, the
paper's N/A cells; so do the kinds after the paper, which act inside the blocks (or, for
`conditional`, after the first one) wherever their placement would be: `placement` is the
axis of the paper's additive tables.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitexp.models.patch_embed import Size2d
from vitexp.models.rope import check_positions

ROPE_KINDS = ("rope_axial", "rope_mixed", "rope_axial_ape", "rope_mixed_ape")
MODERN_KINDS = (*ROPE_KINDS, "relative_2d", "conditional")
KINDS = ("none", "learned_1d", "learned_2d", "relative", "sincos_2d", *MODERN_KINDS)
PLACEMENTS = ("stem", "every_layer", "every_layer_shared")
STEM_ONLY_KINDS = ("none", "relative", *MODERN_KINDS)
# RoPE's theta by kind (RoPE-ViT: 100 for fixed axial frequencies, 10 for learned mixed ones)
ROPE_THETA = {"rope_axial": 100.0, "rope_mixed": 10.0}
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
ABSOLUTE_KINDS = ("learned_1d", "learned_2d", "sincos_2d")


class NotApplicableCell(ValueError):
    """A Table-8 cell the paper marks N/A (none or relative at an every-layer placement):
    the one exception for it, which a sweep records as N/A instead of a failure."""

    exit_code = 2  # a user's choice, like any config error


@dataclass
class PosEmbedSpec:
    """How positions are encoded; also the Hydra `model/pos_embed` config node."""

    kind: str = "learned_1d"
    placement: str = "stem"
    # Resampling on resize(): timm and this project default to bicubic with antialiasing;
    # the paper's original code used bilinear (set interpolation=bilinear, antialias=false).
    interpolation: str = "bicubic"
    antialias: bool = True
    # Std of the learned tables at init. The paper's code: 0.02; big_vision: 1/sqrt(width).
    # Small tables next to unit-scale patch embeddings are why a tiny ViT can sit for
    # hundreds of steps on a position-blind plateau (see ablation_posemb).
    init_std: float = 0.02
    # RoPE kinds: the frequency base (null: 100 axial, 10 mixed) and, at another resolution,
    # whether positions extend the grid (extrapolate) or squeeze into the trained range
    rope_theta: float | None = None
    rope_positions: str = "extrapolate"
    # relative_2d: one bias table shared by every block (BEiT) instead of one per block
    shared: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"pos_embed.kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"pos_embed.placement={self.placement!r} is not one of {', '.join(PLACEMENTS)}"
            )
        if self.kind in MODERN_KINDS and self.placement != "stem":
            raise NotApplicableCell(
                f"pos_embed.kind={self.kind} with placement={self.placement} is an N/A cell: "
                f"{self.kind} acts inside the blocks, not as an added table, and exists only "
                "at placement=stem"
            )
        if self.kind in STEM_ONLY_KINDS and self.placement != "stem":
            raise NotApplicableCell(
                f"pos_embed.kind={self.kind} with placement={self.placement} is an N/A cell of "
                f"the paper's Table 8: {self.kind} exists only at placement=stem"
            )
        if not self.init_std > 0:
            raise ValueError(f"pos_embed.init_std={self.init_std!r} must be > 0")
        if self.rope_theta is not None and not self.rope_theta > 0:
            raise ValueError(f"pos_embed.rope_theta={self.rope_theta!r} must be > 0")
        if self.rope_theta is not None and self.kind not in ROPE_KINDS:
            raise ValueError(f"pos_embed.rope_theta applies to {', '.join(ROPE_KINDS)} only")
        check_positions(self.rope_positions)
        if self.shared and self.kind != "relative_2d":
            raise ValueError("pos_embed.shared=true applies to kind=relative_2d only")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"pos_embed.interpolation={self.interpolation!r} is not one of "
                f"{', '.join(INTERPOLATIONS)}"
            )

    @property
    def theta(self) -> float:
        """RoPE's frequency base: the configured one or the kind's default."""
        return self.rope_theta or ROPE_THETA[self.kind.removesuffix("_ape")]

    @property
    def table_kind(self) -> str | None:
        """The additive table this kind adds ("_ape" RoPE: a learned 1-D one), or None."""
        if self.kind in ABSOLUTE_KINDS:
            return self.kind
        return "learned_1d" if self.kind.endswith("_ape") else None

    @classmethod
    def parse(cls, value: PosEmbedSpec | dict | str) -> PosEmbedSpec:
        """Accept a spec, a mapping of its fields, or just the kind."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(kind=value)
        return cls(**dict(value))


def _interpolate(x: torch.Tensor, size: Size2d, mode: str, antialias: bool) -> torch.Tensor:
    """Resize a (1, C, H, W) tensor in float32 and return it in its own dtype."""
    kwargs = {} if mode == "nearest" else {"antialias": antialias, "align_corners": False}
    return F.interpolate(x.float(), size=size, mode=mode, **kwargs).to(x.dtype)


def resample_grid(
    table: torch.Tensor,
    old_grid: Size2d,
    new_grid: Size2d,
    num_prefix_tokens: int,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, prefix + H*W, D) table to a new grid as a 2-D image; prefix rows kept.

    Same values as timm's `resample_abs_pos_embed` with the same settings.
    """
    if tuple(old_grid) == tuple(new_grid):
        return table
    prefix, grid = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = _interpolate(grid, new_grid, interpolation, antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, grid], dim=1)


def resample_table_2d(
    table: torch.Tensor, old: Size2d, new: Size2d, interpolation: str, antialias: bool
) -> torch.Tensor:
    """Resample an (H*W, C) row-major table to (H'*W', C) as an H x W image of C channels."""
    if tuple(old) == tuple(new):
        return table
    image = table.t().reshape(1, -1, old[0], old[1])
    return _interpolate(image, new, interpolation, antialias).reshape(-1, new[0] * new[1]).t()


def resample_1d(
    table: torch.Tensor, new_len: int, interpolation: str = "bicubic", antialias: bool = True
) -> torch.Tensor:
    """Resample a (L, C) table along L, with the same kernel as the 2-D case (1-D cubic...)."""
    if table.shape[0] == new_len:
        return table
    image = table.t().unsqueeze(0).unsqueeze(2)  # (1, C, 1, L)
    return _interpolate(image, (1, new_len), interpolation, antialias)[0, :, 0].t()


def posemb_sincos_2d(grid: Size2d, dim: int, temperature: float = 10_000.0) -> torch.Tensor:
    """(H*W, D) fixed embedding: [sin(x w), cos(x w), sin(y w), cos(y w)] per patch."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs embed_dim divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    omega = torch.arange(dim // 4) / max(dim // 4 - 1, 1)
    omega = 1.0 / temperature**omega
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class AbsolutePosEmbed(nn.Module, ABC):
    """A table of one vector per token, added to the tokens: `x + table()`."""

    def __init__(self, grid_size: Size2d, num_prefix_tokens: int, dim: int):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.dim = dim

    @abstractmethod
    def table(self) -> torch.Tensor:
        """The (1, T, D) embedding of every token, prefix tokens first."""

    @abstractmethod
    def resize(self, grid_size: Size2d, interpolation: str, antialias: bool) -> None:
        """Resample (or rebuild) the table for a new patch grid, in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table().to(x.dtype)


class LearnedPosEmbed1D(AbsolutePosEmbed):
    """1-D: one learned vector per sequence position, prefix (class) tokens included."""

    def __init__(self, grid_size: Size2d, num_prefix_tokens: int, dim: int, init_std: float = 0.02):
        super().__init__(grid_size, num_prefix_tokens, dim)
        num_tokens = num_prefix_tokens + grid_size[0] * grid_size[1]
        self.weight = nn.Parameter(torch.empty(1, num_tokens, dim))
        nn.init.trunc_normal_(self.weight, std=init_std)

    def table(self) -> torch.Tensor:
        return self.weight

    @torch.no_grad()
    def resize(self, grid_size: Size2d, interpolation: str, antialias: bool) -> None:
        """Interpolate the grid part as an H x W image of D channels."""
        new = resample_grid(
            self.weight, self.grid_size, grid_size, self.num_prefix_tokens, interpolation, antialias
        )
        self.weight = nn.Parameter(new.contiguous())
        self.grid_size = tuple(grid_size)


class LearnedPosEmbed2D(AbsolutePosEmbed):
    """2-D: X (column) and Y (row) tables of D/2 each, concatenated per patch."""

    def __init__(self, grid_size: Size2d, num_prefix_tokens: int, dim: int, init_std: float = 0.02):
        super().__init__(grid_size, num_prefix_tokens, dim)
        if dim % 2:
            raise ValueError(f"learned_2d needs an even embed_dim (two halves), got {dim}")
        self.x_embed = nn.Parameter(torch.empty(grid_size[1], dim // 2))
        self.y_embed = nn.Parameter(torch.empty(grid_size[0], dim // 2))
        self.prefix_embed = (
            nn.Parameter(torch.empty(1, num_prefix_tokens, dim)) if num_prefix_tokens else None
        )
        for p in (self.x_embed, self.y_embed, self.prefix_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=init_std)

    def table(self) -> torch.Tensor:
        rows, cols = self.grid_size
        x = self.x_embed[None, :, :].expand(rows, cols, -1)  # (H, W, D/2): X[col]
        y = self.y_embed[:, None, :].expand(rows, cols, -1)  # (H, W, D/2): Y[row]
        grid = torch.cat([x, y], dim=-1).reshape(1, rows * cols, self.dim)
        if self.prefix_embed is None:
            return grid
        return torch.cat([self.prefix_embed, grid], dim=1)

    @torch.no_grad()
    def resize(self, grid_size: Size2d, interpolation: str, antialias: bool) -> None:
        """Interpolate each axis table on its own axis (1-D)."""
        x = resample_1d(self.x_embed, grid_size[1], interpolation, antialias)
        y = resample_1d(self.y_embed, grid_size[0], interpolation, antialias)
        self.x_embed = nn.Parameter(x.contiguous())
        self.y_embed = nn.Parameter(y.contiguous())
        self.grid_size = tuple(grid_size)


class SinCosPosEmbed2D(AbsolutePosEmbed):
    """Fixed 2-D sin-cos; prefix tokens get zeros. A buffer, not a parameter: it is not in
    the state dict and is recomputed for any grid, so `kind=sincos_2d` and the temperature
    (in the model config saved with every checkpoint) are all that records it."""

    def __init__(self, grid_size: Size2d, num_prefix_tokens: int, dim: int, temperature=10_000.0):
        super().__init__(grid_size, num_prefix_tokens, dim)
        self.temperature = temperature
        self.register_buffer("fixed", self._build(grid_size), persistent=False)

    def _build(self, grid_size: Size2d) -> torch.Tensor:
        grid = posemb_sincos_2d(grid_size, self.dim, self.temperature)
        prefix = torch.zeros(self.num_prefix_tokens, self.dim)
        return torch.cat([prefix, grid], dim=0)[None]

    def table(self) -> torch.Tensor:
        return self.fixed

    def resize(self, grid_size: Size2d, interpolation: str, antialias: bool) -> None:
        self.fixed = self._build(grid_size).to(self.fixed.device)
        self.grid_size = tuple(grid_size)


def build_absolute_pos_embed(
    kind: str, grid_size: Size2d, num_prefix_tokens: int, dim: int, init_std: float = 0.02
) -> AbsolutePosEmbed:
    if kind == "sincos_2d":
        return SinCosPosEmbed2D(grid_size, num_prefix_tokens, dim)
    learned = {"learned_1d": LearnedPosEmbed1D, "learned_2d": LearnedPosEmbed2D}
    if kind not in learned:
        raise ValueError(f"{kind!r} is not an absolute position embedding ({ABSOLUTE_KINDS})")
    return learned[kind](grid_size, num_prefix_tokens, dim, init_std)


class RelativePositionBias(nn.Module):
    """1-D relative attention logits for one layer (paper D.4, after Shaw et al. 2018).

    Tokens are numbered along the sequence, patches in row-major order. Each offset
    k - q between a query patch q and a key patch k, from -(N-1) to N-1, has a learned
    vector r (width = head dim, shared by the heads). The query attends to these vectors as
    extra keys: bias[q, k] = <query_q, r_(k-q)> * scale, added to the content logits
    before the softmax.

    Class token: it is not on the patch grid, so it has no offset to a patch. Like BEiT,
    it gets three learned vectors of its own instead: class->patch, patch->class and
    class->class (shared by all prefix tokens if there were several).

    Resampling (`resize`): the paper defines none. Offsets are 1-D positions along the
    flattened sequence, so the table is treated like a 1-D learned embedding over the
    normalised offset (k - q) / N and interpolated from 2N-1 to 2N'-1 entries with the
    configured kernel; the three class-token vectors are kept. This keeps "near" and "far"
    along the sequence where they were; the exact row period (offset = +-W) moves with the
    aspect of the new grid, which fine-tuning re-learns. Exact 2-D resampling would need
    2-D relative offsets, which are not this paper's variant.
    """

    NUM_SPECIAL = 3  # class->patch, patch->class, class->class

    def __init__(
        self, grid_size: Size2d, num_prefix_tokens: int, head_dim: int, init_std: float = 0.02
    ):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        num_patches = grid_size[0] * grid_size[1]
        self.offset_embed = nn.Parameter(torch.empty(2 * num_patches - 1, head_dim))
        nn.init.trunc_normal_(self.offset_embed, std=init_std)
        self.special_embed = None
        if num_prefix_tokens:
            self.special_embed = nn.Parameter(torch.empty(self.NUM_SPECIAL, head_dim))
            nn.init.trunc_normal_(self.special_embed, std=init_std)
        self.register_buffer("index", self._build_index(), persistent=False)

    def _build_index(self) -> torch.Tensor:
        """(T, T) index into cat([offset_embed, special_embed]) for each query/key pair."""
        n, p = self.grid_size[0] * self.grid_size[1], self.num_prefix_tokens
        pos = torch.arange(n)
        index = torch.empty(p + n, p + n, dtype=torch.long)
        index[p:, p:] = pos[None, :] - pos[:, None] + (n - 1)  # key - query, shifted to >= 0
        special = 2 * n - 1
        index[:p, p:] = special  # class -> patch
        index[p:, :p] = special + 1  # patch -> class
        index[:p, :p] = special + 2  # class -> class
        return index

    def forward(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """q: (B, heads, Tq, head_dim), the queries of the first Tq tokens -> bias
        (B, heads, Tq, T)."""
        table = self.offset_embed
        if self.special_embed is not None:
            table = torch.cat([table, self.special_embed], dim=0)
        table = table.to(q.dtype)
        logits = (q * scale) @ table.t()  # (B, heads, Tq, R): the query against every offset
        index = self.index[: q.shape[2]].expand(*q.shape[:2], -1, -1)
        return logits.gather(-1, index)

    @torch.no_grad()
    def resize(self, grid_size: Size2d, interpolation: str, antialias: bool) -> None:
        n = grid_size[0] * grid_size[1]
        offsets = resample_1d(self.offset_embed, 2 * n - 1, interpolation, antialias)
        self.offset_embed = nn.Parameter(offsets.contiguous())
        self.grid_size = tuple(grid_size)
        self.index = self._build_index().to(self.index.device)


class PositionEncodingGenerator(nn.Module):
    """CPVT's conditional position encoding (Chu et al. 2023): the patch tokens, laid out on
    their grid, plus a depthwise 3x3 convolution of themselves (zero padding tells a token
    where the border is). No table, so any grid works; the class token passes unchanged."""

    def __init__(self, grid_size: Size2d, num_prefix_tokens: int, dim: int):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.proj = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        prefix, patches = x[:, :p], x[:, p:]
        grid = patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.grid_size)
        grid = self.proj(grid) + grid
        return torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)

    def resize(self, grid_size: Size2d, interpolation: str, antialias: bool) -> None:
        self.grid_size = tuple(grid_size)


class PositionEmbedding(nn.ModuleList):
    """What each layer adds for position (Table 8's columns): the absolute tables of the
    placement, and `forward(x, layer)` adding the right one at the input of block `layer`.

    - stem: one table, added before block 0;
    - every_layer: one table per block, each added at its own block's input;
    - every_layer_shared: one table, added at every block's input.

    `none` holds no table and `relative` none either: relative positions act inside each
    block's attention (`relative_bias` builds that block's `RelativePositionBias`); so do
    RoPE and the 2-D bias (the encoder builds those). `conditional` holds the generator,
    applied at the input of block 1 (after the first block, CPVT's choice).
    """

    def __init__(
        self, spec: PosEmbedSpec, grid_size: Size2d, num_prefix_tokens: int, dim: int, depth: int
    ):
        super().__init__()
        self.spec = spec
        if spec.table_kind is not None:
            tables = depth if spec.placement == "every_layer" else 1
            for _ in range(tables):
                self.append(
                    build_absolute_pos_embed(
                        spec.table_kind, grid_size, num_prefix_tokens, dim, spec.init_std
                    )
                )
        elif spec.kind == "conditional":
            if depth < 2:
                raise ValueError(
                    "pos_embed.kind=conditional acts after the first block: depth >= 2"
                )
            self.append(PositionEncodingGenerator(grid_size, num_prefix_tokens, dim))

    def table_for_layer(self, layer: int) -> int | None:
        """Index of the table added at the input of block `layer` (None: nothing)."""
        if not len(self):
            return None
        if self.spec.kind == "conditional":
            return 0 if layer == 1 else None
        if self.spec.placement == "every_layer":
            return layer
        return 0 if self.spec.placement == "every_layer_shared" or layer == 0 else None

    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        index = self.table_for_layer(layer)
        return x if index is None else self[index](x)

    def relative_bias(
        self, grid_size: Size2d, num_prefix_tokens: int, head_dim: int
    ) -> RelativePositionBias | None:
        """A block's own relative-attention table (kind=relative), else None."""
        if self.spec.kind != "relative":
            return None
        return RelativePositionBias(grid_size, num_prefix_tokens, head_dim, self.spec.init_std)

    def resize(self, grid_size: Size2d) -> None:
        for table in self:
            table.resize(grid_size, self.spec.interpolation, self.spec.antialias)


def describe(spec: PosEmbedSpec) -> str:
    """Short label, e.g. '1-D / every layer', as the paper's table names the cells."""
    kinds = {
        "none": "none",
        "learned_1d": "1-D",
        "learned_2d": "2-D",
        "relative": "relative",
        "sincos_2d": "sin-cos 2-D",
        "rope_axial": "RoPE-Axial",
        "rope_mixed": "RoPE-Mixed",
        "rope_axial_ape": "RoPE-Axial + APE",
        "rope_mixed_ape": "RoPE-Mixed + APE",
        "relative_2d": "2-D relative bias" + (" (shared)" if spec.shared else ""),
        "conditional": "conditional (PEG)",
    }
    if spec.kind in MODERN_KINDS:  # no placement axis: they sit where they act
        return kinds[spec.kind]
    return f"{kinds[spec.kind]} / {spec.placement.replace('_', ' ')}"


def square_grid(num_tokens: int, num_prefix_tokens: int) -> Size2d:
    """Square grid of a (1, prefix + H*W, D) table, for weights that carry no grid size."""
    side = math.isqrt(num_tokens - num_prefix_tokens)
    if side * side != num_tokens - num_prefix_tokens:
        raise ValueError(
            f"position table has {num_tokens - num_prefix_tokens} patch positions, not a "
            "square grid: pass the grid size explicitly"
        )
    return (side, side)
