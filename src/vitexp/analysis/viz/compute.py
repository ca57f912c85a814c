"""The numbers behind the paper's pictures (Figure 6, Figure 7, Appendix D.7-D.8).

Pure tensor functions, no plotting:

- attention rollout (Abnar & Zuidema 2020; the paper's D.8): R = Â_L ... Â_1 with
  Â_l = rownorm((mean over heads of A_l + I) / 2), the identity standing for the residual;
- token boxes: the pixels each patch token sees (overlapping patches, hybrid stem) and the
  mapping of per-token values back to pixels;
- mean attention distance (Figure 7 right): per layer and head, the attention-weighted mean
  pixel distance from a query patch's centre to the key patches' centres;
- position-embedding similarity (Figure 7 centre) and its grid-of-small-maps layout; for
  the encodings after the paper, RoPE's phase similarity, the 2-D relative bias as an image
  of offsets, and what CPVT's generator adds to a constant token grid;
- principal components of the embedding filters (Figure 7 left).

Boxes are (x0, y0, x1, y1) in pixels, end exclusive (torchvision's order), one per patch
token in row-major order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitexp.models.hybrid import STRIDE, HybridEmbed
from vitexp.models.patch_embed import Size2d
from vitexp.models.relative_2d import NUM_SPECIAL, relative_index_2d
from vitexp.models.resnet import StdConv2d


def rounded(t: torch.Tensor, digits: int = 5):
    """A tensor as nested lists of floats rounded to `digits` (for figures.json)."""
    return np.round(t.detach().double().cpu().numpy(), digits).tolist()


# --- attention rollout ---------------------------------------------------------------------
def attention_rollout(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rollout of a list of per-layer attentions (B, heads, T, T), first layer first.

    Returns R (B, T, T): row t is how much output token t draws on each input token.
    """
    if not maps:
        raise ValueError("attention_rollout needs at least one layer's attention")
    rollout = None
    for attn in maps:
        a = attn.double().mean(dim=1)  # (B, T, T): average the heads
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # the residual path
        a = a / a.sum(dim=-1, keepdim=True)  # rows sum to 1 again: (A + I) / 2
        rollout = a if rollout is None else a @ rollout  # a later layer acts on the left
    return rollout.float()


def rollout_to_patches(rollout: torch.Tensor, num_prefix_tokens: int, pool: str) -> torch.Tensor:
    """(B, T, T) rollout -> (B, N) map over the patch tokens, prefix columns dropped: the
    class token's row for `pool=cls`; for `pool=gap` (the output is the mean of the patch
    tokens) the mean of the patch tokens' rows."""
    p = num_prefix_tokens
    if pool == "cls":
        return rollout[:, 0, p:]
    return rollout[:, p:, p:].mean(dim=1)


# --- tokens and pixels ---------------------------------------------------------------------
def patch_boxes(grid_size: Size2d, patch_size: Size2d, stride: Size2d, scale: int = 1):
    """(N, 4) long boxes of a rows x cols grid of patches; `scale` maps feature-map cells to
    pixels (the hybrid stem's ResNet stride)."""
    rows, cols = grid_size
    y0 = torch.arange(rows) * stride[0] * scale
    x0 = torch.arange(cols) * stride[1] * scale
    y0, x0 = torch.meshgrid(y0, x0, indexing="ij")
    y0, x0 = y0.flatten(), x0.flatten()
    return torch.stack([x0, y0, x0 + patch_size[1] * scale, y0 + patch_size[0] * scale], dim=1)


def token_boxes(model: nn.Module) -> torch.Tensor:
    """Pixel box of every patch token of a VisionTransformer. Patch stem: the patch itself
    (overlapping when stride < patch size). Hybrid stem: the feature-map cells the token
    covers, each cell a STRIDE x STRIDE block of pixels (its nominal footprint; the ResNet's
    receptive field is larger)."""
    embed = model.patch_embed
    scale = STRIDE if isinstance(embed, HybridEmbed) else 1  # its patches are map cells
    return patch_boxes(model.grid_size, embed.patch_size, embed.stride, scale=scale)


def tokens_to_pixels(values: torch.Tensor, boxes: torch.Tensor, img_size: Size2d):
    """(B, N) per-token values -> (B, H, W): each pixel gets the mean of the values of the
    tokens whose box covers it (0 where none does)."""
    values = values.detach().float().cpu()
    total = torch.zeros(values.shape[0], *img_size)
    count = torch.zeros(*img_size)
    for n, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        total[:, y0:y1, x0:x1] += values[:, n, None, None]
        count[y0:y1, x0:x1] += 1
    return total / count.clamp(min=1)


def box_centres(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 2) centres (x, y) in pixels of (N, 4) boxes."""
    boxes = boxes.double()
    return torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)


def mean_attention_distance(
    maps: Sequence[torch.Tensor], boxes: torch.Tensor, num_prefix_tokens: int
) -> torch.Tensor:
    """(layers, heads) mean attention distance in pixels (the paper's Figure 7 right).

    For each query patch, its weights over the patch keys (prefix tokens dropped, the rest
    renormalised to sum to 1) average the distances from its centre to the keys' centres;
    the result is averaged over query patches and over the batch.
    """
    centres = box_centres(boxes)
    dist = torch.cdist(centres, centres)  # (N, N) pixels
    p = num_prefix_tokens
    per_layer = []
    for attn in maps:
        a = attn[..., p:, p:].double().cpu()  # (B, heads, N, N): patch queries, patch keys
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        per_layer.append((a * dist).sum(dim=-1).mean(dim=(0, 2)))  # (heads,)
    return torch.stack(per_layer).float()


# --- position embeddings -------------------------------------------------------------------
def pos_embed_similarity(table: torch.Tensor) -> torch.Tensor:
    """(N, D) embeddings -> (N, N) cosine similarity of every pair."""
    t = F.normalize(table.detach().double().cpu(), dim=-1)
    return (t @ t.T).float()


def grid_structure(similarity: torch.Tensor, grid_size: Size2d) -> dict[str, float]:
    """The numbers behind "position embeddings learn 2-D structure" (the paper's Fig. 7
    centre), from an (N, N) similarity of a rows x cols grid's patches (self pairs left out):

    neighbours_minus_far: mean similarity to the 4 adjacent patches minus to the far ones
        (grid distance >= half the longer side); > 0: close patches have similar embeddings.
    same_row_col_minus_other: mean similarity to the patches in the same row or column
        minus to the others; > 0: the row/column structure the paper shows.
    """
    rows, cols = grid_size
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.reshape(-1).double(), c.reshape(-1).double()
    dr, dc = (r[:, None] - r[None]).abs(), (c[:, None] - c[None]).abs()
    dist = torch.sqrt(dr**2 + dc**2)
    other = ~torch.eye(rows * cols, dtype=torch.bool)
    same_line = ((dr == 0) | (dc == 0)) & other
    s = similarity.double()

    def mean(mask: torch.Tensor) -> float:
        return float(s[mask].mean()) if mask.any() else float("nan")

    far = dist >= max(rows, cols) / 2
    return {
        "neighbours": mean(dist == 1),
        "far": mean(far),
        "neighbours_minus_far": mean(dist == 1) - mean(far),
        "same_row_col_minus_other": mean(same_line) - mean(other & ~same_line),
    }


def similarity_mosaic(similarity: torch.Tensor, grid_size: Size2d, gap: int = 1) -> np.ndarray:
    """Lay out an (N, N) similarity as the paper does: a rows x cols grid of tiles, tile
    (i, j) the rows x cols map of patch (i, j)'s similarity to every patch; NaN between."""
    rows, cols = grid_size
    sim = similarity.numpy().reshape(rows, cols, rows, cols)
    out = np.full((rows * (rows + gap) - gap, cols * (cols + gap) - gap), np.nan)
    for i in range(rows):
        for j in range(cols):
            top, left = i * (rows + gap), j * (cols + gap)
            out[top : top + rows, left : left + cols] = sim[i, j]
    return out


def position_tables(model: nn.Module, layer: int) -> list[tuple[int, torch.Tensor]]:
    """The absolute position tables to draw, as (layer, (N, D) patch rows): the one table of
    `stem` / `every_layer_shared`; for `every_layer` the first layer's and `layer`'s."""
    tables = model.encoder.pos_embeds
    if not len(tables):
        return []
    p = model.num_prefix_tokens
    layers = [0, layer] if len(tables) > 1 and layer != 0 else [0]
    return [(i, tables[i].table()[0, p:].detach()) for i in layers]


def rope_phase_similarity(angles: torch.Tensor) -> torch.Tensor:
    """(heads, N, pairs) rotary angles -> (heads, N, N) mean over the channel pairs of
    cos(angle_p - angle_q): a RoPE'd query-key score of identical content (equal energy in
    every pair) at patches p and q, relative to the same two at one patch."""
    a = angles.detach().double().cpu()
    cos, sin = a.cos(), a.sin()
    # cos(a - b) = cos a cos b + sin a sin b, averaged over the pairs
    return ((cos @ cos.transpose(1, 2) + sin @ sin.transpose(1, 2)) / a.shape[-1]).float()


def by_offset(similarity: torch.Tensor, grid_size: Size2d) -> torch.Tensor:
    """(..., N, N) pair values -> (..., 2H-1, 2W-1) their mean over the pairs of each 2-D
    offset (row, column of p minus those of q; the centre is offset 0): for a function of
    the offset alone (RoPE's phase similarity) its exact value."""
    rows, cols = grid_size
    index = relative_index_2d(grid_size, 0).flatten()  # (N*N,) offset of each pair
    size = (2 * rows - 1) * (2 * cols - 1)
    flat = similarity.double().flatten(-2)
    total = torch.zeros(*flat.shape[:-1], size, dtype=torch.float64)
    total.index_add_(-1, index, flat)
    count = torch.bincount(index, minlength=size).double()
    return (total / count).reshape(*flat.shape[:-1], 2 * rows - 1, 2 * cols - 1).float()


def relative_2d_tables(rel_pos: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A `RelativePositionBias2D`'s table as (heads, 2H-1, 2W-1) images of the bias of each
    offset (query - key, row-major; the centre is offset 0) and its (heads, k) class-token
    entries (class -> patch, patch -> class, class -> class; k = 0 without a class token)."""
    rows, cols = rel_pos.grid_size
    table = rel_pos.table.detach().float().cpu()  # (offsets + special, heads)
    offsets = (2 * rows - 1) * (2 * cols - 1)
    images = table[:offsets].T.reshape(-1, 2 * rows - 1, 2 * cols - 1)
    special = table[offsets : offsets + NUM_SPECIAL].T
    return images, special


def conditional_addition(peg: nn.Module) -> torch.Tensor:
    """(N, D) what a `PositionEncodingGenerator` adds to an all-ones token grid, less its
    conv's bias (the same at every patch): its depthwise 3x3 conv of the zero-padded grid,
    per channel the sum of the kernel taps that fall inside the grid. Interior patches all
    get the same vector; border ones differ: the PEG's only absolute position signal."""
    conv = peg.proj
    weight = conv.weight.detach().double().cpu()  # (D, 1, 3, 3)
    ones = torch.ones(1, weight.shape[0], *peg.grid_size, dtype=torch.float64)
    out = F.conv2d(ones, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out[0].flatten(1).T.float()  # (N, D), row-major


# --- embedding filters ---------------------------------------------------------------------
def effective_conv_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The kernel a conv applies: weight-standardised for StdConv2d (the hybrid's ResNet)."""
    w = conv.weight.detach().float().cpu()
    if isinstance(conv, StdConv2d):
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + conv.eps)
    return w


def embedding_filters(model: nn.Module) -> tuple[torch.Tensor, bool]:
    """(D, C, kh, kw) filters to analyse, and whether they are the hybrid's ResNet root conv
    (its patch projection acts on the 1024-channel feature map, not on pixels)."""
    if isinstance(model.patch_embed, HybridEmbed):
        return effective_conv_weight(model.patch_embed.backbone.root[0]), True
    return effective_conv_weight(model.patch_embed.proj), False


def embedding_filter_pcs(weight: torch.Tensor, k: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Top principal components of conv filters (D, C, kh, kw), each filter a vector.

    Returns (k', C, kh, kw) components and their (k',) explained-variance ratios, with
    k' = min(k, D - 1, C*kh*kw) (centring D filters leaves rank D - 1). Each component's
    sign is fixed so that its largest-magnitude entry is positive.
    """
    d = weight.shape[0]
    x = weight.detach().double().cpu().reshape(d, -1)
    x = x - x.mean(dim=0, keepdim=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small matrix: one thread takes ~0.1 s, several can spin long
    try:
        _, s, vh = torch.linalg.svd(x, full_matrices=False)  # vh: (min(D, CPP), CPP)
    finally:
        torch.set_num_threads(threads)
    k = max(1, min(k, d - 1, x.shape[1]))
    var = s**2
    ratio = var[:k] / var.sum().clamp_min(1e-30)
    pcs = vh[:k]
    sign = torch.sign(pcs.gather(1, pcs.abs().argmax(dim=1, keepdim=True)))
    pcs = pcs * torch.where(sign == 0, torch.ones_like(sign), sign)
    return pcs.reshape(k, *weight.shape[1:]).float(), ratio.float()


def unit_range(x: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] (a constant becomes 0.5)."""
    lo, hi = x.min(), x.max()
    if hi - lo < 1e-12:
        return torch.full_like(x, 0.5)
    return (x - lo) / (hi - lo)
