"""The position encodings after the paper: RoPE (axial, mixed, + APE), the 2-D relative
bias, CPVT's conditional encoding, LayerScale; equal to timm's where timm has them."""

from __future__ import annotations

import pytest
import torch

from test_pos_embed import shuffle_patches
from vitexp.models import NotApplicableCell, VisionTransformer
from vitexp.models.convert import from_timm
from vitexp.models.relative_2d import RelativePositionBias2D
from vitexp.models.rope import RotaryAxial, RotaryMixed, apply_rope

from conftest import MODERN_CELLS, randomize_, tiny_vit

timm = pytest.importorskip("timm")

SHARED_2D = {"kind": "relative_2d", "shared": True}
SPECS = [{"kind": k, "placement": p} for k, p in MODERN_CELLS] + [SHARED_2D]
IDS = [s["kind"] for s in SPECS[:-1]] + ["relative_2d_shared"]


def _timm_rope_model(name: str, **kwargs) -> torch.nn.Module:
    """A registered RoPE-ViT model, random weights, LayerScale raised so blocks matter."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()
    randomize_(model, 0.02)
    with torch.no_grad():
        for block in model.blocks:
            block.gamma_1.fill_(0.5)
            block.gamma_2.fill_(0.5)
    return model


@pytest.mark.parametrize(
    "name,kind",
    [
        ("vit_small_patch16_rope_224", "rope_axial"),
        ("vit_small_patch16_rope_mixed_224", "rope_mixed"),
        ("vit_small_patch16_rope_mixed_ape_224", "rope_mixed_ape"),
        ("vit_small_patch16_rope_ape_224", "rope_axial_ape"),
    ],
)
def test_from_timm_rope_vit_gives_the_same_logits(name, kind):
    ref = _timm_rope_model(name)
    model = from_timm(ref).eval()
    assert model.cfg.pos_embed.kind == kind and model.cfg.layer_scale
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want, got = ref(x), model(x)
        # the rotation matters: without it the logits move far beyond the tolerance
        model.encoder.rope.resize(model.grid_size, "interpolate")
        model.encoder.rope.train_grid = (1, 1)  # squeeze every position to 0
        unrotated = model(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (unrotated - want).abs().max() > 1e-2


@pytest.mark.parametrize("cls", [RotaryAxial, RotaryMixed])
def test_rope_angles_are_timms_on_a_non_square_grid(cls):
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingMixed

    grid, head_dim = (3, 5), 16
    if cls is RotaryAxial:
        ours = RotaryAxial(grid, head_dim, theta=100.0)
        theirs = RotaryEmbeddingCat(
            head_dim, temperature=100.0, in_pixels=False, feat_shape=list(grid), grid_indexing="xy"
        ).get_embed()  # (N, 2 * head_dim): sin, cos, each pair-interleaved
    else:
        ref = RotaryEmbeddingMixed(head_dim * 2, depth=2, num_heads=2, feat_shape=list(grid))
        ours = RotaryMixed(grid, head_dim, depth=2, num_heads=2)
        ours.freqs.data.copy_(ref.freqs)
        theirs = ref.get_embed()[1]  # layer 1: (heads, N, 2 * head_dim)
    sin, cos = ours(1, torch.device("cpu"))
    torch.testing.assert_close(sin.repeat_interleave(2, -1).squeeze(0), theirs[..., :head_dim])
    torch.testing.assert_close(cos.repeat_interleave(2, -1).squeeze(0), theirs[..., head_dim:])


def test_rope_scores_depend_on_the_offset_only():
    rope = RotaryAxial((6, 6), 8)
    sin, cos = rope(0, torch.device("cpu"))
    q, k = torch.randn(8), torch.randn(8)
    rq = apply_rope(q.expand(36, 8), sin[0], cos[0])
    rk = apply_rope(k.expand(36, 8), sin[0], cos[0])
    # patch (r, c) = index 6r + c: the pairs (0,0)-(1,2) and (3,2)-(4,4) share offset (1, 2)
    assert torch.allclose(rq[0] @ rk[8], rq[20] @ rk[28], atol=1e-5)
    assert not torch.allclose(rq[0] @ rk[8], rq[0] @ rk[9], atol=1e-3)


@pytest.mark.parametrize(
    "name,positions",
    [
        ("vit_small_patch16_rope_224", "extrapolate"),
        ("vit_small_patch16_rope_224", "interpolate"),
        ("vit_small_patch16_rope_mixed_224", "extrapolate"),  # timm's mixed: no ref shape
    ],
)
def test_rope_at_another_resolution_is_timms(name, positions):
    """Extrapolate: timm's RoPE on the new grid; interpolate: EVA's ref_feat_shape."""
    ref = _timm_rope_model(name)
    model = from_timm(ref).eval()
    model.resize(160, rope_positions=positions)
    kwargs = {"ref_feat_shape": (14, 14)} if positions == "interpolate" else {}
    at_160 = timm.create_model(name, pretrained=False, num_classes=7, img_size=160, **kwargs)
    at_160.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(model(x), at_160.eval()(x), atol=1e-4, rtol=0)


def test_rope_extrapolate_and_interpolate_differ_away_from_the_training_grid_only():
    model = randomize_(tiny_vit(pos_embed="rope_mixed", num_heads=2)).eval()
    x32, x48 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = model(x32)
        model.resize(32, rope_positions="interpolate")
        torch.testing.assert_close(model(x32), before)  # the training grid: no change
        model.resize(48)
        squeezed = model(x48)
        model.resize(48, rope_positions="extrapolate")
        assert (model(x48) - squeezed).abs().max() > 1e-3
        model.resize(32)
        torch.testing.assert_close(model(x32), before)  # and back, exactly


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
@pytest.mark.parametrize("prefix", [0, 1])
def test_relative_2d_lookup_equals_timms_relposbias(grid, prefix):
    from timm.layers.pos_embed_rel import RelPosBias

    theirs = RelPosBias(grid, num_heads=3, prefix_tokens=prefix)
    ours = RelativePositionBias2D(grid, prefix, num_heads=3)
    assert ours.table.shape == theirs.relative_position_bias_table.shape
    ours.table.data.copy_(theirs.relative_position_bias_table)
    assert torch.equal(ours.bias(), theirs.get_bias())


def test_relative_2d_shared_is_one_table_for_every_block():
    shared = tiny_vit(pos_embed=SHARED_2D, depth=3)
    own = tiny_vit(pos_embed="relative_2d", depth=3)
    table = (2 * 4 - 1) ** 2 + 3  # 4x4 grid + class-token entries
    assert shared.encoder.shared_rel_pos.table.shape == (table, 4)
    assert all(b.attn.rel_pos is None for b in shared.encoder.blocks)
    assert [b.attn.rel_pos.table.shape for b in own.encoder.blocks] == [(table, 4)] * 3
    assert "encoder.shared_rel_pos.table" in shared.no_weight_decay()
    assert shared.layer_ids()["encoder.shared_rel_pos.table"] == 0


def test_relative_2d_resize_keeps_the_offsets_as_an_image():
    model = tiny_vit(pos_embed="relative_2d")
    rel = model.encoder.blocks[0].attn.rel_pos
    with torch.no_grad():  # a bias that grows with the row offset, class entries marked
        rows = torch.arange(7.0).repeat_interleave(7)
        rel.table[:49] = rows[:, None]
        rel.table[49:] = -5.0
    model.resize(48)  # 4x4 -> 6x6 patches: 7x7 -> 11x11 offsets
    assert rel.table.shape == (11 * 11 + 3, 4)
    assert torch.equal(rel.table[121:], torch.full((3, 4), -5.0))
    offsets = rel.table[:121, 0].reshape(11, 11)
    assert (offsets[:, 5].diff() > 0).all()  # still increasing along the row offset
    assert offsets[:, 0].allclose(offsets[:, 10], atol=1e-5)  # and flat along columns


def test_conditional_encoding_is_a_depthwise_conv_with_a_residual_after_block_0():
    model = randomize_(tiny_vit(pos_embed="conditional", depth=3)).eval()
    peg = model.encoder.pos_embeds[0]
    assert peg.proj.groups == 32 and peg.proj.kernel_size == (3, 3)
    assert [model.encoder.pos_embeds.table_for_layer(i) for i in range(3)] == [None, 0, None]
    tokens = torch.randn(2, 17, 32)
    with torch.no_grad():
        peg.proj.weight.zero_()
        peg.proj.bias.zero_()
        assert torch.equal(peg(tokens), tokens)  # the residual alone
    with pytest.raises(ValueError, match="conditional acts after the first block: depth >= 2"):
        tiny_vit(pos_embed="conditional", depth=1)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_modern_encodings_see_positions(spec):
    model = randomize_(tiny_vit(pos_embed=spec)).eval()
    images = torch.randn(3, 3, 32, 32)
    shuffled = shuffle_patches(images, 8, torch.randperm(16))
    with torch.no_grad():
        diff = model.forward_features(images)[:, 0] - model.forward_features(shuffled)[:, 0]
    assert diff.abs().max() > 1e-3


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_modern_encodings_learn_and_run_at_any_grid(spec, pool):
    model = randomize_(tiny_vit(pos_embed=spec, pool=pool, img_size=(24, 40)))
    model(torch.randn(2, 3, 24, 40)).sum().backward()
    names = {n for n, p in model.named_parameters()}
    learned = [n for n in names if any(s in n for s in ("pos_embeds", "rel_pos", "rope"))]
    assert len(learned) >= (spec["kind"] != "rope_axial")
    grads = dict(model.named_parameters())
    assert all(grads[n].grad is not None and grads[n].grad.abs().sum() > 0 for n in learned)
    assert set(learned) <= model.no_weight_decay()
    model.resize(48)
    out = model(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_cls_only_last_block_equals_the_full_forward_with_rope_and_bias():
    for spec in ("rope_mixed", SHARED_2D, "relative_2d"):
        model = randomize_(tiny_vit(pos_embed=spec)).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))


@pytest.mark.parametrize("kind,placement", [(k, "every_layer") for k, _ in MODERN_CELLS])
def test_modern_kinds_at_every_layer_are_na_cells(kind, placement):
    with pytest.raises(NotApplicableCell, match=f"{kind} with placement={placement}"):
        tiny_vit(pos_embed={"kind": kind, "placement": placement})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pos_embed": {"kind": "learned_1d", "shared": True}}, "shared=true applies to"),
        ({"pos_embed": {"kind": "learned_1d", "rope_theta": 10}}, "rope_theta applies to"),
        ({"pos_embed": {"kind": "rope_axial", "rope_theta": 0}}, "rope_theta=0 must be > 0"),
        ({"pos_embed": {"kind": "rope_mixed", "rope_positions": "x"}}, "rope_positions='x'"),
        ({"pos_embed": "rope_axial", "num_heads": 16}, "head dimension .* divisible by 4"),
        ({"layer_scale_init": 0.0}, "layer_scale_init=0.0 must be > 0"),
    ],
)
def test_bad_modern_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_vit(**kwargs)


def test_layer_scale_starts_at_its_init_and_imports_from_timm_vit():
    model = tiny_vit(layer_scale_init=1e-3)
    assert torch.equal(model.encoder.blocks[1].ls2.gamma, torch.full((32,), 1e-3))
    assert isinstance(tiny_vit().encoder.blocks[0].ls1, torch.nn.Identity)
    ref = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        num_classes=5,
        init_values=0.3,
    ).eval()
    randomize_(ref)
    converted = from_timm(ref).eval()
    assert converted.cfg.layer_scale
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), ref(x), atol=1e-5, rtol=0)


def test_rope_mixed_frequencies_start_in_perpendicular_pairs():
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, pos_embed="rope_mixed"
    )
    fx, fy = model.encoder.rope.freqs  # each (depth, heads, head_dim / 2)
    half = fx.shape[-1] // 2
    dot = fx[..., :half] * fx[..., half:] + fy[..., :half] * fy[..., half:]
    assert dot.abs().max() < 1e-6  # the two directions of each magnitude are perpendicular
    magnitude = (fx[..., :half] ** 2 + fy[..., :half] ** 2).sqrt()
    assert torch.allclose(magnitude[0, 0], 1 / 10 ** (torch.arange(0, 32, 4) / 32))
