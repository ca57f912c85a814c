"""The figures of the position encodings after the paper: RoPE's phase similarity, the 2-D
relative bias as an image of offsets, and what CPVT's generator adds to a constant grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from test_visualize import check_outputs, save_checkpoint
from vitexp.analysis.viz import plots
from vitexp.analysis.viz.compute import by_offset, rope_phase_similarity
from vitexp.analysis.viz.positions import pos_embed_view
from vitexp.models.rope import apply_rope
from vitexp.visualize import VisualizeCommandConfig, visualize_checkpoint

from conftest import randomize_, tiny_vit

MODERN = {
    "rope_axial": "rope_axial",
    "rope_mixed": "rope_mixed",
    "rope_axial_ape": "rope_axial_ape",
    "rope_mixed_ape": "rope_mixed_ape",
    "relative_2d": "relative_2d",
    "relative_2d_shared": {"kind": "relative_2d", "shared": True},
    "conditional": "conditional",
}


def view(model, layer: int = -1) -> dict:
    """figures.json's pos-embed entry of `model` (the PNG rendered and dropped)."""
    png, data = pos_embed_view(model, layer % len(model.encoder.blocks))
    assert png.startswith(b"\x89PNG")
    return data


def patch(r: int, c: int, cols: int) -> int:
    return r * cols + c


def rope_score(model, layer: int, p: int, q: int) -> torch.Tensor:
    """Per head, the score of one content vector rotated to patches p and q, divided by its
    norm squared; the content has the same energy in every channel pair."""
    angles = model.encoder.rope.angles(layer, torch.device("cpu")).detach().double()  # (H, N, P)
    pairs = angles.shape[-1]
    phi = torch.rand(pairs, dtype=torch.float64) * 2 * math.pi
    v = torch.stack([phi.cos(), phi.sin()], dim=-1).reshape(-1) / math.sqrt(pairs)  # |v| = 1
    rotated = apply_rope(v.expand(*angles.shape[:2], -1), angles.sin(), angles.cos())
    return (rotated[:, p] * rotated[:, q]).sum(-1)  # (H,)


# --- RoPE --------------------------------------------------------------------------------------
def test_phase_similarity_and_its_offsets_by_hand():
    angles = torch.tensor([[[0.0, 0.0], [math.pi / 3, math.pi]]])  # 1 head, 1 x 2 grid, 2 pairs
    sim = rope_phase_similarity(angles)
    expected = (0.5 + -1.0) / 2  # mean of cos(pi/3) and cos(pi)
    assert torch.allclose(sim, torch.tensor([[[1.0, expected], [expected, 1.0]]]), atol=1e-6)
    assert torch.allclose(by_offset(sim, (1, 2)), torch.tensor([[[expected, 1.0, expected]]]))


def test_axial_phase_similarity_is_the_rope_score_and_depends_on_the_offset_only():
    model = tiny_vit(img_size=(24, 32), pos_embed="rope_axial")  # 3 x 4 grid
    data = view(model, layer=0)
    rotary = data["rotary"]
    assert rotary["same_in_every_layer"] and rotary["heads"] == 1 and rotary["channel_pairs"] == 4
    sim = np.array(rotary["similarity"])
    assert sim.shape == (12, 12) and np.allclose(np.diag(sim), 1.0, atol=1e-5)
    for r in range(3):
        for c in range(4):  # the map of patch (r, c) is the map of patch (0, 0), shifted
            tile = sim[patch(r, c, 4)].reshape(3, 4)
            origin = sim[0].reshape(3, 4)
            assert np.allclose(tile[r:, c:], origin[: 3 - r, : 4 - c], atol=1e-5)
    offsets = np.array(rotary["by_offset"])
    assert offsets.shape == (1, 5, 7) and offsets[0, 2, 3] == pytest.approx(1.0)
    p, q = patch(2, 3, 4), patch(0, 1, 4)
    assert sim[p, q] == pytest.approx(offsets[0, 2 + 2, 3 + 2], abs=1e-5)  # offset p - q
    assert sim[p, q] == pytest.approx(float(rope_score(model, 0, p, q)[0]), abs=1e-5)
    assert not np.allclose(sim, 1.0)
    assert view(model, layer=1)["rotary"]["similarity"] == rotary["similarity"]
    assert "tables" not in data and "learned 1-D table" not in data["note"]


def test_mixed_phase_similarity_is_the_chosen_layers_per_head():
    model = tiny_vit(depth=3, pos_embed="rope_mixed")
    data = view(model, layer=1)
    rotary = data["rotary"]
    assert data["layer"] == 1 and not rotary["same_in_every_layer"] and rotary["heads"] == 4
    offsets = np.array(rotary["by_offset"])  # (heads, 2H-1, 2W-1)
    assert offsets.shape == (4, 7, 7) and np.allclose(offsets[:, 3, 3], 1.0, atol=1e-5)
    sim = np.array(rotary["similarity"])
    p, q = patch(3, 0, 4), patch(1, 2, 4)
    per_head = rope_score(model, 1, p, q).numpy()
    assert np.allclose(offsets[:, 3 + 2, 3 - 2], per_head, atol=1e-5)
    assert sim[p, q] == pytest.approx(per_head.mean(), abs=1e-5)  # the heads' mean
    assert not np.allclose(per_head, per_head[0], atol=1e-3)  # the heads differ
    with torch.no_grad():
        model.encoder.rope.freqs[:, 0] *= 3.0  # another layer's frequencies: no effect
    assert view(model, layer=1)["rotary"] == rotary
    with torch.no_grad():
        model.encoder.rope.freqs[:, 1] *= 3.0
    assert view(model, layer=1)["rotary"]["similarity"] != rotary["similarity"]


def test_ape_kinds_draw_the_learned_table_beside_the_phases():
    model = randomize_(tiny_vit(pos_embed="rope_axial_ape"))
    data = view(model)
    [table] = data["tables"]
    assert table["layer"] == 0 and "learned 1-D table" in data["note"]
    weight = model.encoder.pos_embeds[0].weight[0, 1:].detach().double()
    unit = weight / weight.norm(dim=1, keepdim=True)
    assert np.allclose(table["similarity"], (unit @ unit.T).numpy(), atol=1e-5)
    assert np.array(data["rotary"]["similarity"]).shape == (16, 16)


# --- 2-D relative bias -----------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True])
def test_relative_2d_draws_the_table_as_offsets_per_head(shared: bool):
    model = randomize_(
        tiny_vit(img_size=(24, 32), pos_embed={"kind": "relative_2d", "shared": shared})
    )
    rel_pos = model.encoder.shared_rel_pos if shared else model.encoder.blocks[0].attn.rel_pos
    data = view(model, layer=0)
    assert data["shared"] is shared and data["layer"] == (None if shared else 0)
    tables = np.array(data["tables"])
    table = rel_pos.table.detach().numpy()  # (5 * 7 + 3, heads)
    assert tables.shape == (4, 5, 7)
    assert np.allclose(tables, table[:35].T.reshape(4, 5, 7), atol=1e-5)
    entries = data["class_token"]
    assert np.allclose(entries["class_to_patch"], table[35], atol=1e-5)
    assert np.allclose(entries["patch_to_class"], table[36], atol=1e-5)
    assert np.allclose(entries["class_to_class"], table[37], atol=1e-5)
    bias = rel_pos.bias()[0].detach().numpy()  # (heads, T, T): the drawn offset is query - key
    query, key = patch(2, 0, 4), patch(0, 3, 4)
    assert np.allclose(bias[:, 1 + query, 1 + key], tables[:, 2 + 2, -3 + 3], atol=1e-5)
    if not shared:  # the chosen layer's table, not another's
        other = model.encoder.blocks[1].attn.rel_pos.table.detach().numpy()
        assert np.allclose(view(model, layer=1)["tables"], other[:35].T.reshape(4, 5, 7), atol=1e-5)
        assert not np.allclose(tables, other[:35].T.reshape(4, 5, 7), atol=1e-3)


def test_relative_2d_without_a_class_token_has_no_class_entries():
    model = tiny_vit(pool="gap", pos_embed="relative_2d")
    data = view(model)
    assert "class_token" not in data and np.array(data["tables"]).shape == (4, 7, 7)


# --- conditional (PEG) -----------------------------------------------------------------------
def test_conditional_draws_what_the_generator_adds_to_a_constant_grid():
    model = randomize_(tiny_vit(pos_embed="conditional"))
    peg = model.encoder.pos_embeds[0]
    data = view(model)
    assert data["applied_at_block"] == 1 and "zero padding" in data["note"]
    ones = torch.ones(1, 17, 32)
    with torch.no_grad():  # the generator itself: output - input - bias, per patch
        added = peg(ones)[0, 1:] - 1 - peg.proj.bias
    norm = np.array(data["addition_norm"])
    assert norm.shape == (4, 4)
    assert np.allclose(norm.reshape(-1), added.norm(dim=1).numpy(), atol=1e-4)
    assert data["bias_norm"] == pytest.approx(float(peg.proj.bias.detach().norm()), abs=1e-5)
    sim = np.array(data["similarity"])
    interior = [patch(r, c, 4) for r in (1, 2) for c in (1, 2)]
    assert np.allclose(sim[np.ix_(interior, interior)], 1.0, atol=1e-5)  # no position inside
    assert not np.allclose(sim[0, interior], 1.0, atol=1e-3)  # a corner sees the padding

    with torch.no_grad():  # all-ones kernel: each channel adds the taps inside the grid
        peg.proj.weight.fill_(1.0)
    taps = np.array([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]])
    assert np.allclose(view(model)["addition_norm"], taps * math.sqrt(32), atol=1e-3)

    with torch.no_grad():  # a zero kernel adds nothing that depends on the position
        peg.proj.weight.zero_()
    data = view(model)
    assert np.array(data["addition_norm"]).max() == 0 and np.array(data["similarity"]).max() == 0


# --- the command, every new kind --------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODERN))
def test_command_draws_every_new_kind(name: str, tmp_path: Path):
    model = randomize_(tiny_vit(pos_embed=MODERN[name]))
    ckpt = save_checkpoint(tmp_path / "run/checkpoints/last.ckpt", model)
    config = VisualizeCommandConfig(pretrained=str(ckpt), out=str(tmp_path / "out"), layer=-2)
    report = visualize_checkpoint(config)
    check_outputs(tmp_path / "out")  # all four PNGs, many colours each
    assert np.array(report["attention_maps"]["maps"]).shape == (2, 4, 4)
    distance = np.array(report["attention_distance"]["distance"])
    assert distance.shape == (2, 4) and (distance > 0).all()
    pos = report["pos_embed_similarity"]
    assert pos["kind"] == model.cfg.pos_embed.kind and pos["grid"] == [4, 4]
    if name.startswith("rope"):
        assert pos["layer"] == 0 and np.array(pos["rotary"]["similarity"]).shape == (16, 16)
        heads = 1 if "axial" in name else 4
        assert np.array(pos["rotary"]["by_offset"]).shape == (heads, 7, 7)
        assert ("tables" in pos) is name.endswith("_ape")
    elif name.startswith("relative_2d"):
        assert np.array(pos["tables"]).shape == (4, 7, 7)
        assert pos["layer"] == (None if pos["shared"] else 0)
        assert len(pos["class_token"]["class_to_class"]) == 4
    else:
        assert np.array(pos["addition_norm"]).shape == (4, 4)
        assert np.array(pos["similarity"]).shape == (16, 16)


@pytest.mark.parametrize(
    "pos_embed, heads",
    [
        ("rope_axial", 4),
        ("rope_mixed_ape", 8),  # 1 + 8 + 1 panels, wrapped in rows
        ("relative_2d", 8),
        ({"kind": "relative_2d", "shared": True}, 4),
        ("conditional", 4),
    ],
)
def test_every_new_title_fits_inside_its_figure(pos_embed, heads: int, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "png_bytes", lambda fig: figures.append(fig) or b"\x89PNG")
    model = tiny_vit(embed_dim=64, num_heads=heads, pos_embed=pos_embed)
    view(model)
    [fig] = figures
    FigureCanvasAgg(fig)
    fig.set_dpi(plots.DPI)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for text in {*fig.texts, *(ax.title for ax in fig.axes)}:
        box = text.get_window_extent(renderer)
        inside = (box.min >= fig.bbox.min).all() and (box.max <= fig.bbox.max).all()
        assert inside or not text.get_text(), f"{text.get_text()!r}: {box} not in {fig.bbox}"
