"""The ViT itself: sizes, patches, pooling, attention maps, heads, errors."""

from __future__ import annotations

import pytest
import torch

from vitexp.models import SIZES, VisionTransformer, create_model

from conftest import randomize_, tiny_vit

TIMM_NAMES = {
    "vit_ti16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
    "vit_b32": "vit_base_patch32_224",
    "vit_l16": "vit_large_patch16_224",
    "vit_h14": "vit_huge_patch14_224",
}


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_sizes_have_timms_parameter_count(name):
    import timm

    with torch.device("meta"):  # no memory, no init cost: H/14 has 632M parameters
        ours = create_model(name, num_classes=1000)
        ref = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(ref)


def test_paper_table_1_widths():
    # Table 1 of the paper: Layers, Hidden size D, MLP size, Heads
    for name, (layers, width, mlp, heads) in {
        "vit_b16": (12, 768, 3072, 12),
        "vit_l16": (24, 1024, 4096, 16),
        "vit_h14": (32, 1280, 5120, 16),
    }.items():
        with torch.device("meta"):
            m = create_model(name)
        assert len(m.encoder.blocks) == layers and m.embed_dim == width
        assert m.encoder.blocks[0].mlp.fc1.out_features == mlp
        assert m.encoder.blocks[0].attn.num_heads == heads
    assert SIZES["vit_b16"][1]["patch_size"] == 16 and SIZES["vit_h14"][1]["patch_size"] == 14


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'vit_x99'; choose one of vit_ti16"):
        create_model("vit_x99")


@pytest.mark.parametrize(
    "img,patch,stride,grid",
    [
        (32, 8, None, (4, 4)),
        (32, 8, 4, (7, 7)),
        (36, 8, 4, (8, 8)),
        ((24, 40), 8, 8, (3, 5)),
        (33, 3, 2, (16, 16)),
    ],
)
def test_patch_grid_and_overlapping_tokens(img, patch, stride, grid):
    model = tiny_vit(img_size=img, patch_size=patch, patch_stride=stride)
    assert model.grid_size == grid
    x = torch.randn(2, 3, *model.img_size)
    assert model.forward_features(x).shape == (2, 1 + grid[0] * grid[1], 32)


def test_overlapping_patches_cover_shared_pixels():
    """With stride < patch size, one pixel change touches neighbouring tokens."""
    model = tiny_vit(img_size=32, patch_size=8, patch_stride=4, pos_embed="none").eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., 6, 6] += 1.0  # in patches (0,0), (0,1), (1,0), (1,1) of the 7x7 grid
    changed = (model.patch_embed(x) - model.patch_embed(y)).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [0, 1, 7, 8]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(img_size=30, patch_size=8), "image height 30 does not tile into patches of 8"),
        (dict(img_size=(32, 30), patch_size=8), "image width 30 does not tile"),
        (dict(img_size=32, patch_size=8, patch_stride=16), "would skip pixels"),
        (dict(img_size=32, patch_size=8, patch_stride=5), "with stride 5"),
        (dict(img_size=4, patch_size=8), "image height 4 does not tile"),
        (dict(embed_dim=30, num_heads=4), "embed_dim=30 is not divisible by num_heads=4"),
        (dict(pool="max"), "pool='max' is not one of cls, gap"),
        (dict(pool="cls", class_token=False), "pool=cls needs class_token=true"),
        (dict(pos_embed="learned_2d", embed_dim=33, num_heads=3), "learned_2d needs an even"),
        (dict(pos_embed="sincos_2d", embed_dim=34, num_heads=2), "divisible by 4"),
        (dict(img_size="big"), "img_size='big': use an int or \\[height, width\\]"),
        (dict(stem="vgg"), "stem='vgg' is not one of patch, r50"),
    ],
)
def test_invalid_construction_raises_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_vit(**kwargs)


def test_wrong_input_size_says_to_resize():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"input is \(48, 48\).*call model.resize"):
        model(torch.randn(1, 3, 48, 48))


def test_cls_and_gap_pooling():
    model = randomize_(tiny_vit(pool="cls"))
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    gap = randomize_(tiny_vit(pool="gap"))
    assert gap.cls_token is None and gap.num_tokens == 16
    tokens = gap.forward_features(x)
    torch.testing.assert_close(gap.forward_head(tokens, pre_logits=True), tokens.mean(1))
    gap_fc = randomize_(tiny_vit(pool="gap", fc_norm=True))
    tokens = gap_fc.forward_features(x)
    pooled = torch.nn.functional.layer_norm(
        tokens.mean(1), (32,), gap_fc.fc_norm.weight, gap_fc.fc_norm.bias, 1e-6
    )
    torch.testing.assert_close(gap_fc.forward_head(tokens, pre_logits=True), pooled)


def test_pre_logits_layer_and_reset_classifier():
    model = randomize_(tiny_vit(representation_size=24))
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)[:, 0]
    fc = model.pre_logits[0]
    torch.testing.assert_close(
        model.forward_head(model.forward_features(x), pre_logits=True), torch.tanh(fc(feats))
    )
    assert model.head.in_features == 24
    model.reset_classifier(7)
    assert isinstance(model.pre_logits, torch.nn.Identity) and model.head.in_features == 32
    assert model.cfg.representation_size is None and model.num_classes == 7
    assert torch.all(model(x) == 0)  # the paper's zero-initialised fine-tuning head


def test_zero_classes_gives_features():
    model = tiny_vit(num_classes=0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_attention_maps_shapes_rows_and_equal_to_the_fused_path():
    for spec in ("learned_1d", "relative", "none"):
        model = randomize_(tiny_vit(pos_embed=spec, depth=3)).eval()
        x = torch.randn(2, 3, 32, 32)
        maps = model.attention_maps(x)
        assert len(maps) == 3 and all(m.shape == (2, 4, 17, 17) for m in maps)
        torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 4, 17))
        explicit, _ = model.encoder(model.embed(x), return_attention=True)
        torch.testing.assert_close(explicit, model.forward_features(x), atol=1e-5, rtol=1e-5)


def test_attention_maps_equal_manual_softmax():
    model = randomize_(tiny_vit()).eval()
    x = torch.randn(1, 3, 32, 32)
    block = model.encoder.blocks[0]
    tokens = model.encoder.pos_embeds(model.embed(x), 0)  # eval: no position dropout
    h = block.norm1(tokens)
    q, k, _ = block.attn.qkv(h).reshape(1, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = ((q @ k.transpose(-2, -1)) / 8**0.5).softmax(-1)
    torch.testing.assert_close(model.attention_maps(x)[0], expected)


def test_dropout_and_drop_path_only_in_training():
    model = randomize_(tiny_vit(drop_rate=0.3, attn_drop_rate=0.3, drop_path_rate=0.5))
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    rates = [b.drop_path.p for b in model.encoder.blocks]
    assert rates == [0.0, 0.5]


def test_no_weight_decay_lists_embeddings():
    names = tiny_vit(pos_embed={"kind": "learned_1d", "placement": "every_layer"}).no_weight_decay()
    assert names == {"cls_token", "encoder.pos_embeds.0.weight", "encoder.pos_embeds.1.weight"}
    rel = tiny_vit(pos_embed="relative").no_weight_decay()
    assert "encoder.blocks.1.attn.rel_pos.offset_embed" in rel


def test_config_rebuilds_the_same_model():
    model = randomize_(tiny_vit(pos_embed={"kind": "learned_2d", "placement": "every_layer"}))
    model.resize(48)
    clone = VisionTransformer(model.cfg, num_classes=model.num_classes)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 48, 48)
    model.eval(), clone.eval()
    torch.testing.assert_close(clone(x), model(x))


def test_bf16_autocast_runs():
    model = randomize_(tiny_vit(pos_embed="relative"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
