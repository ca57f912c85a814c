"""Position embeddings: every Table-8 cell, the N/A cells, parameter counts, resampling."""

from __future__ import annotations

import pytest
import torch

from vitexp.models import PosEmbedSpec, create_model
from vitexp.models.pos_embed import (
    LearnedPosEmbed2D,
    RelativePositionBias,
    posemb_sincos_2d,
    resample_1d,
    resample_grid,
)

from conftest import NA_CELLS, VALID_CELLS, randomize_, tiny_vit

ALL_KINDS = VALID_CELLS + [("sincos_2d", p) for p in ("stem", "every_layer", "every_layer_shared")]


def shuffle_patches(images: torch.Tensor, patch: int, perm: torch.Tensor) -> torch.Tensor:
    """Cut (B, C, H, W) into non-overlapping patches, permute them, put the image back."""
    B, C, H, W = images.shape
    rows, cols = H // patch, W // patch
    p = images.reshape(B, C, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    p = p.reshape(B, rows * cols, C, patch, patch)[:, perm]
    p = p.reshape(B, rows, cols, C, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return p.reshape(B, C, H, W)


@pytest.mark.parametrize("kind,placement", ALL_KINDS)
def test_patch_shuffle_changes_output_only_with_positions(kind, placement):
    """The lecture's argument: without positions the encoder sees a set of patches."""
    model = randomize_(tiny_vit(pos_embed={"kind": kind, "placement": placement})).eval()
    images = torch.randn(3, 3, 32, 32)
    shuffled = shuffle_patches(images, 8, torch.randperm(16))
    with torch.no_grad():
        out = model.forward_features(images)[:, 0]  # class-token output
        out_shuffled = model.forward_features(shuffled)[:, 0]
    diff = (out - out_shuffled).abs().max().item()
    if kind == "none":
        assert diff <= 1e-5
    else:
        assert diff > 1e-3


def test_shuffle_helper_really_permutes():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    perm = torch.randperm(16)
    shuffled = shuffle_patches(images, 8, perm)
    assert not torch.equal(images, shuffled)
    assert torch.equal(
        shuffled[:, :, :8, :8],
        images[:, :, (perm[0] // 4) * 8 :, :][:, :, :8, (perm[0] % 4) * 8 : (perm[0] % 4) * 8 + 8],
    )


@pytest.mark.parametrize("kind,placement", ALL_KINDS)
@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_cells_forward_backward_two_resolutions_and_resize(kind, placement, pool):
    spec = {"kind": kind, "placement": placement}
    for size in (32, (24, 40)):
        model = randomize_(tiny_vit(img_size=size, pos_embed=spec, pool=pool))
        x = torch.randn(2, 3, *model.img_size)
        model(x).sum().backward()
        # every table gets a gradient (for relative: the first layer's; in the last layer
        # only the pooled tokens' queries matter)
        learned = [
            p
            for n, p in model.named_parameters()
            if "pos_embeds" in n or "blocks.0.attn.rel_pos" in n
        ]
        assert len(learned) >= (kind not in ("none", "sincos_2d"))
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)
    model = randomize_(tiny_vit(pos_embed=spec, pool=pool))
    model.resize(48)
    assert model.grid_size == (6, 6) and model.num_tokens == 36 + (pool == "cls")
    out = model(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()


@pytest.mark.parametrize("kind,placement", NA_CELLS)
def test_na_cells_raise(kind, placement):
    with pytest.raises(ValueError, match=f"{kind} with placement={placement} is an N/A cell"):
        tiny_vit(pos_embed={"kind": kind, "placement": placement})


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"kind": "learned_3d"}, "pos_embed.kind='learned_3d' is not one of"),
        ({"placement": "everywhere"}, "pos_embed.placement='everywhere'"),
        ({"interpolation": "lanczos"}, "pos_embed.interpolation='lanczos'"),
        ({"init_std": 0.0}, "pos_embed.init_std=0.0 must be > 0"),
    ],
)
def test_bad_spec_names_the_key(spec, match):
    with pytest.raises(ValueError, match=match):
        PosEmbedSpec(**spec)


@pytest.mark.parametrize("init_std", [0.02, 0.125])
@pytest.mark.parametrize("kind", ["learned_1d", "learned_2d", "relative"])
def test_learned_tables_start_at_init_std(kind, init_std):
    torch.manual_seed(0)
    model = create_model(
        "vit_b16", num_classes=3, img_size=64, pos_embed={"kind": kind, "init_std": init_std}
    )
    tables = [p for n, p in model.named_parameters() if "pos_embed" in n or "rel_pos" in n]
    values = torch.cat([t.detach().flatten() for t in tables])
    assert values.numel() > 1000 and values.std().item() == pytest.approx(init_std, rel=0.1)


def test_a_size_keeps_its_init_std_when_the_kind_is_overridden():
    """The Python path; tests/test_config.py checks the Hydra one."""
    for pos_embed in ("learned_2d", {"kind": "relative"}):
        assert create_model("vit_tiny_p8", 3, pos_embed=pos_embed).cfg.pos_embed.init_std == 0.125
    assert create_model("vit_tiny_debug", 3, pos_embed="learned_2d").cfg.pos_embed.init_std == 0.02
    given = create_model("vit_tiny_p8", 3, pos_embed={"kind": "learned_2d", "init_std": 0.05})
    assert given.cfg.pos_embed.init_std == 0.05


def _extra_params(**spec) -> int:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(tiny_vit(pos_embed=spec)) - count(tiny_vit(pos_embed="none"))


def test_parameter_counts_follow_the_definitions():
    D, depth, tokens, rows, cols, head_dim = 32, 2, 17, 4, 4, 8
    table_1d = tokens * D
    table_2d = cols * D // 2 + rows * D // 2 + D  # X table, Y table, class-token vector
    assert _extra_params(kind="learned_1d", placement="stem") == table_1d
    assert _extra_params(kind="learned_1d", placement="every_layer") == depth * table_1d
    assert _extra_params(kind="learned_1d", placement="every_layer_shared") == table_1d
    assert _extra_params(kind="learned_2d", placement="stem") == table_2d
    assert _extra_params(kind="learned_2d", placement="every_layer") == depth * table_2d
    assert _extra_params(kind="learned_2d", placement="every_layer_shared") == table_2d
    # relative: per layer, one vector per offset -(N-1)..N-1 and 3 class-token vectors
    assert _extra_params(kind="relative") == depth * (2 * 16 - 1 + 3) * head_dim
    assert _extra_params(kind="sincos_2d") == 0


def test_every_layer_adds_its_own_table_at_each_block():
    model = tiny_vit(pos_embed={"kind": "learned_1d", "placement": "every_layer"}, depth=3)
    tables = [t.weight for t in model.encoder.pos_embeds]
    assert len(tables) == 3 and len({t.data_ptr() for t in tables}) == 3
    seen = []
    for block in model.encoder.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x = torch.randn(1, 3, 32, 32)
    tokens = model.embed(x)
    model.forward_features(x)
    # block 0 sees tokens + table 0; block i sees its predecessor's output + table i
    torch.testing.assert_close(seen[0], tokens + tables[0])
    for i in (1, 2):
        prev = model.encoder.blocks[i - 1](seen[i - 1])[0]
        torch.testing.assert_close(seen[i], prev + tables[i])


def test_shared_placement_adds_one_table_everywhere():
    model = tiny_vit(pos_embed={"kind": "learned_2d", "placement": "every_layer_shared"}, depth=3)
    assert len(model.encoder.pos_embeds) == 1
    table = model.encoder.pos_embeds[0].table()
    seen = []
    for block in model.encoder.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    model.forward_features(torch.randn(1, 3, 32, 32))
    for i in (1, 2):
        prev = model.encoder.blocks[i - 1](seen[i - 1])[0]
        torch.testing.assert_close(seen[i], prev + table)


def test_learned_2d_concatenates_x_and_y_by_coordinate():
    table = LearnedPosEmbed2D((3, 5), num_prefix_tokens=1, dim=8)
    full = table.table()[0]  # (1 + 15, 8)
    torch.testing.assert_close(full[0], table.prefix_embed[0, 0])
    for row in range(3):
        for col in range(5):
            expected = torch.cat([table.x_embed[col], table.y_embed[row]])
            torch.testing.assert_close(full[1 + row * 5 + col], expected)


def test_learned_2d_resize_interpolates_each_axis():
    model = tiny_vit(pos_embed="learned_2d")
    table = model.encoder.pos_embeds[0]
    x_old, y_old = table.x_embed.clone(), table.y_embed.clone()
    model.resize((48, 64))  # grid 4x4 -> 6x8
    assert table.y_embed.shape == (6, 16) and table.x_embed.shape == (8, 16)
    torch.testing.assert_close(table.x_embed, resample_1d(x_old, 8))
    torch.testing.assert_close(table.y_embed, resample_1d(y_old, 6))
    # a linear ramp stays a ramp under bilinear 1-D interpolation (checks the axis is right)
    ramp = torch.arange(4.0)[:, None].repeat(1, 3)
    up = resample_1d(ramp, 8, "bilinear", antialias=False)
    torch.testing.assert_close(up[:, 0], up[:, 2])
    assert torch.all(up[1:-1, 0].diff() > 0)


def test_learned_1d_resize_matches_timm():
    from timm.layers import resample_abs_pos_embed

    table = torch.randn(1, 1 + 14 * 14, 24)
    for new, mode, aa in [
        ((24, 24), "bicubic", True),
        ((10, 18), "bicubic", True),
        ((20, 20), "bilinear", False),
    ]:
        ours = resample_grid(table, (14, 14), new, 1, mode, aa)
        ref = resample_abs_pos_embed(table, new, (14, 14), 1, mode, aa)
        assert (ours - ref).abs().max().item() <= 1e-6


def test_model_resize_learned_1d_matches_timm_and_keeps_class_row():
    from timm.layers import resample_abs_pos_embed

    model = tiny_vit(pos_embed={"kind": "learned_1d", "placement": "every_layer"})
    before = [t.weight.clone() for t in model.encoder.pos_embeds]
    model.resize((40, 56))
    for old, table in zip(before, model.encoder.pos_embeds, strict=True):
        ref = resample_abs_pos_embed(old, (5, 7), (4, 4), 1, "bicubic", True)
        torch.testing.assert_close(table.weight, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(table.weight[:, 0], old[:, 0])


def test_resize_to_same_size_is_identity():
    model = randomize_(tiny_vit(pos_embed="learned_1d")).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    model.resize(32)
    torch.testing.assert_close(model(x), before)


def test_sincos_is_recomputed_not_stored():
    model = tiny_vit(pos_embed="sincos_2d")
    assert not any("pos_embeds" in k for k in model.state_dict())
    model.resize((24, 40))
    table = model.encoder.pos_embeds[0].table()[0]
    torch.testing.assert_close(table[1:], posemb_sincos_2d((3, 5), 32))
    assert torch.all(table[0] == 0)


def test_sincos_values():
    pe = posemb_sincos_2d((2, 3), 8)
    # patch (row 1, col 2): x=2, y=1; omega = [1, 1/10000]
    omega = torch.tensor([1.0, 1e-4])
    expected = torch.cat([(2 * omega).sin(), (2 * omega).cos(), omega.sin(), omega.cos()])
    torch.testing.assert_close(pe[1 * 3 + 2], expected)


def test_relative_bias_matches_a_loop():
    rel = RelativePositionBias((2, 3), num_prefix_tokens=1, head_dim=4)
    q = torch.randn(2, 3, 7, 4)
    bias = rel(q, scale=0.5)
    n = 6
    for i in range(7):
        for j in range(7):
            if i and j:
                r = rel.offset_embed[(j - 1) - (i - 1) + n - 1]
            elif i == 0 and j:
                r = rel.special_embed[0]
            elif j == 0 and i:
                r = rel.special_embed[1]
            else:
                r = rel.special_embed[2]
            torch.testing.assert_close(bias[:, :, i, j], (q[:, :, i] * 0.5) @ r)


def test_relative_bias_is_added_before_the_softmax():
    model = randomize_(tiny_vit(pos_embed="relative")).eval()
    attn = model.encoder.blocks[0].attn
    x = torch.randn(2, 17, 32)
    _, probs = attn(x, return_attention=True)
    q, k, _ = attn.qkv(x).reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + attn.rel_pos(q, attn.scale)
    torch.testing.assert_close(probs, logits.softmax(-1))


def test_relative_resize_keeps_zero_offset_and_class_vectors():
    model = tiny_vit(pos_embed="relative")
    rel = model.encoder.blocks[1].attn.rel_pos
    zero_offset, special = rel.offset_embed[15].clone(), rel.special_embed.clone()
    model.resize(64)  # 16 -> 64 patches: 31 -> 127 offsets
    assert rel.offset_embed.shape == (127, 8) and rel.index.shape == (65, 65)
    torch.testing.assert_close(rel.offset_embed[63], zero_offset, atol=1e-6, rtol=0)
    torch.testing.assert_close(rel.special_embed, special)
    assert rel.index[1, 1] == 63 and rel.index[0, 5] == 127
