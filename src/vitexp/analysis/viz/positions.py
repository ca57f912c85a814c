"""The position-embedding view (the paper's Figure 7 centre) for every `pos_embed.kind`: a
PNG and the numbers behind it (figures.json's `pos_embed_similarity`).

The paper's kinds:
  learned_1d, learned_2d, sincos_2d  cosine similarity of each patch's embedding with every
      other's, as a grid of small maps (one per patch); for `every_layer` the first layer's
      table and `layer`'s.
  relative   cosine similarity of `layer`'s learned 1-D offset vectors.
  none       a message: nothing to draw.

The kinds after the paper, which have no table of one vector per patch:
  rope_*     the similarity of the rotary phases: for patches p and q, the mean over the
      channel pairs of cos(angle_p - angle_q), how much a RoPE'd query-key score of identical
      content depends on the offset (1 at offset 0), in the same grid of small maps.
      RoPE-Axial: one map, the same in every layer and head. RoPE-Mixed: `layer`'s mean over
      the heads, then each head. `_ape`: the learned 1-D table's similarity beside them.
  relative_2d  the learned bias per head as an image of 2-D offsets (query - key, offset 0
      at the centre), of `layer`'s table or of the one shared by every block.
  conditional  what CPVT's generator adds to an all-ones token grid (its conv, bias left
      out): the norm per patch and the similarity of the additions; inside the grid every
      patch gets the same, so what differs is the border seen through the zero padding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitexp.analysis.viz import plots
from vitexp.analysis.viz.compute import (
    by_offset,
    conditional_addition,
    grid_structure,
    pos_embed_similarity,
    position_tables,
    relative_2d_tables,
    rope_phase_similarity,
    rounded,
)
from vitexp.models.pos_embed import ROPE_KINDS, describe
from vitexp.models.rope import RotaryAxial


def pos_embed_view(model: nn.Module, layer: int) -> tuple[bytes, dict]:
    """The PNG and figures.json entry of the model's position encoding at 0-based `layer`."""
    spec = model.cfg.pos_embed
    data: dict[str, Any] = {"kind": spec.kind, "placement": spec.placement}
    if spec.kind == "none":
        data["note"] = "the model has no position embedding (pos_embed.kind=none)"
        text = "This model has no position embedding\n(pos_embed.kind=none): nothing to draw."
        return plots.png_bytes(plots.draw_message(text)), data
    if spec.kind in ROPE_KINDS:
        return _rope_view(model, layer, data)
    if spec.kind == "relative_2d":
        return _relative_2d_view(model, layer, data)
    if spec.kind == "conditional":
        return _conditional_view(model, data)
    n = model.grid_size[0] * model.grid_size[1]
    if spec.kind == "relative":
        sim = pos_embed_similarity(model.encoder.blocks[layer].attn.rel_pos.offset_embed)
        title = (
            f"Relative position embedding, layer {layer}: cosine similarity of the learned\n"
            f"offset table ({2 * n - 1} offsets k - q between key and query patches along the "
            "row-major sequence;\nclass-token vectors excluded)"
        )
        data.update(layer=layer, offsets=[-(n - 1), n - 1], similarity=rounded(sim))
        return plots.png_bytes(plots.draw_relative_similarity(sim, title)), data
    panels, tables = _absolute_tables(model, layer)
    title = (
        f"Position embedding similarity ({describe(spec)}): cosine similarity of each patch's\n"
        "embedding (tile at its row, column) to every patch's (class token excluded)"
    )
    data.update(grid=list(model.grid_size), tables=tables)
    return plots.png_bytes(plots.draw_pos_similarity(panels, model.grid_size, title)), data


def _structure(sim: torch.Tensor, grid_size) -> dict[str, float]:
    return {k: round(v, 5) for k, v in grid_structure(sim, grid_size).items()}


def _absolute_tables(model: nn.Module, layer: int) -> tuple[list, list[dict]]:
    """Panels and figures.json entries of the additive tables (Figure 7 centre)."""
    labels = {
        "stem": "the table added to the input",
        "every_layer_shared": "the table shared by every layer",
    }
    if model.cfg.pos_embed.kind in ROPE_KINDS:  # the `_ape` table
        labels["stem"] = "the learned 1-D table added to the input"
    panels, tables = [], []
    for i, table in position_tables(model, layer):
        sim = pos_embed_similarity(table)
        panels.append((labels.get(model.cfg.pos_embed.placement, f"layer {i}'s table"), sim))
        tables.append({"layer": i, **_structure(sim, model.grid_size), "similarity": rounded(sim)})
    return panels, tables


def _rope_view(model: nn.Module, layer: int, data: dict) -> tuple[bytes, dict]:
    """RoPE: the similarity of the positional phases, mean over channel pairs (and heads)."""
    spec, rope, grid = model.cfg.pos_embed, model.encoder.rope, model.grid_size
    axial = isinstance(rope, RotaryAxial)
    device = next(model.parameters()).device
    sims = rope_phase_similarity(rope.angles(layer, device))  # (heads or 1, N, N)
    mean, pairs = sims.mean(dim=0), rope.head_dim // 2
    what = f"mean over the {pairs} channel pairs of cos(angle_p - angle_q)"
    if axial:
        panels = [("rotary phases (every layer and head)", mean)]
        where = "fixed frequencies: the same in every layer and head"
    else:
        panels = [(f"rotary phases, layer {layer}: mean over the heads", mean)]
        panels += [(f"layer {layer}, head {h}", s) for h, s in enumerate(sims)]
        where = f"layer {layer}'s learned frequencies, per head and their mean"
    data.update(
        layer=layer,
        grid=list(grid),
        rotary={
            "same_in_every_layer": axial,
            "heads": 1 if axial else int(sims.shape[0]),
            "channel_pairs": pairs,
            "positions": rope.positions,
            "measure": f"{what}, mean over the heads; 1 at offset 0",
            **_structure(mean, grid),
            "similarity": rounded(mean),
            "by_offset": rounded(by_offset(sims, grid)),  # (heads, 2H-1, 2W-1)
        },
    )
    data["note"] = (
        "rotary phase similarity of every pair of patches: how much a RoPE'd query-key score "
        "of identical content (equal energy in every channel pair) changes with the patches' "
        "offset; `by_offset` gives it per head as a (2H-1) x (2W-1) image of offsets "
        "(row, column of p minus q; the centre is offset 0)"
    )
    if spec.table_kind is not None:  # the `_ape` kinds: a learned 1-D table at the stem too
        ape_panels, tables = _absolute_tables(model, layer)
        panels += ape_panels
        data["tables"] = tables
        data["note"] += (
            "; the model also adds a learned 1-D table at the stem: `tables` has its cosine "
            "similarity, drawn beside the phases"
        )
    title = (
        f"{describe(spec)}: rotary phase similarity of each patch (tile at its row, column) to "
        f"every patch, the {what}: a RoPE'd score of identical content relative to offset 0 "
        f"({where}; the class token is not rotated)"
    )
    label = "phase similarity" if spec.table_kind is None else "phase / cosine similarity"
    return plots.png_bytes(plots.draw_pos_similarity(panels, grid, title, label)), data


def _relative_2d_view(model: nn.Module, layer: int, data: dict) -> tuple[bytes, dict]:
    """2-D relative bias: per head, the learned bias of every 2-D offset, as an image."""
    shared = model.encoder.shared_rel_pos
    rel_pos = shared if shared is not None else model.encoder.blocks[layer].attn.rel_pos
    images, special = relative_2d_tables(rel_pos)
    rows, cols = model.grid_size
    whose = "the table shared by every block" if shared is not None else f"layer {layer}'s table"
    data.update(
        layer=None if shared is not None else layer,
        shared=shared is not None,
        grid=[rows, cols],
        offsets=[[-(rows - 1), rows - 1], [-(cols - 1), cols - 1]],
        note=(
            f"{whose}: per head a (2H-1) x (2W-1) image of the bias added to the attention "
            "logit of a query and a key patch, indexed by their offset query - key (row, then "
            "column); the centre is offset 0"
        ),
        tables=rounded(images),  # (heads, 2H-1, 2W-1)
    )
    if special.shape[1]:
        names = ("class_to_patch", "patch_to_class", "class_to_class")
        data["class_token"] = {name: rounded(special[:, i]) for i, name in enumerate(names)}
    title = (
        f"2-D relative position bias, {whose}: the learned bias of each head for every offset "
        f"query - key between two patches ({2 * rows - 1} x {2 * cols - 1} offsets, 0 at the "
        "centre; class-token entries in figures.json)"
    )
    return plots.png_bytes(plots.draw_offset_bias(images, title)), data


def _conditional_view(model: nn.Module, data: dict) -> tuple[bytes, dict]:
    """CPVT's PEG: what its depthwise conv adds to an all-ones token grid, per patch."""
    peg = model.encoder.pos_embeds[0]
    grid = model.grid_size
    addition = conditional_addition(peg)  # (N, D)
    norm = addition.double().norm(dim=1).reshape(grid).float()
    sim = pos_embed_similarity(addition)
    data.update(
        applied_at_block=1,
        grid=list(grid),
        probe="all-ones token grid; the conv's bias (the same at every patch) left out",
        note=(
            "a PEG has no table: drawn is what its depthwise 3x3 conv adds to a constant token "
            "grid, per patch. Interior patches all get the same; the border ones differ "
            "through the zero padding, the only absolute position signal a PEG has"
        ),
        bias_norm=round(float(peg.proj.bias.detach().double().norm()), 5)
        if peg.proj.bias is not None
        else 0.0,
        addition_norm=rounded(norm),
        similarity=rounded(sim),
    )
    title = (
        "Conditional position encoding (CPVT's generator, at the input of block 1): no table, "
        "so drawn is what its depthwise 3x3 conv adds to an all-ones token grid (bias left "
        "out). Interior patches get the same vector; the border differs through the zero "
        "padding, the only absolute position signal it has"
    )
    return plots.png_bytes(plots.draw_conditional(norm, sim, grid, title)), data
