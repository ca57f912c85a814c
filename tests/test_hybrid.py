"""Hybrid stem: ResNet-50 (GN + weight standardisation) feature map with 1x1 patches."""

from __future__ import annotations

import warnings

import pytest
import torch

from vitexp.models import create_model
from vitexp.models.hybrid import ResNetStages
from vitexp.models.resnet import StdConv2d, pad_same

from conftest import VALID_CELLS, randomize_


def small_hybrid(**overrides):
    """The real R50 stem with a 1-layer, narrow Transformer (the stem is what is tested)."""
    kwargs = dict(embed_dim=64, depth=1, num_heads=4, num_classes=3)
    kwargs.update(overrides)
    return create_model("hybrid_r50_b16", **kwargs)


def test_feature_map_has_stride_16_and_1024_channels():
    backbone = ResNetStages()
    assert [len(stage) for stage in backbone.stages] == [3, 4, 9]
    assert backbone(torch.randn(1, 3, 64, 96)).shape == (1, 1024, 4, 6)


def test_224_gives_196_tokens_plus_class_token():
    model = small_hybrid()
    assert model.grid_size == (14, 14) and model.num_tokens == 197
    assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 197, 64)


@pytest.mark.parametrize("size", [7, 8, 9, 12, 15])
@pytest.mark.parametrize("kernel, stride", [(7, 2), (3, 2), (3, 1), (1, 2)])
def test_same_padding_is_tensorflows(size, kernel, stride):
    """The paper's JAX code pads "SAME": the odd pixel at the end, as timm's pad_same."""
    timm_layers = pytest.importorskip("timm.layers")
    x = torch.randn(1, 2, size, size + 1)
    want = timm_layers.pad_same(x, (kernel, kernel), (stride, stride))
    torch.testing.assert_close(pad_same(x, kernel, stride), want, rtol=0, atol=0)
    assert pad_same(x, kernel, stride).shape[-1] >= (size + 1)


def test_weight_standardisation():
    """A standardised kernel ignores the scale and shift of the raw weights."""
    ref = StdConv2d(4, 8, 3, bias=False)
    conv = StdConv2d(4, 8, 3, bias=False)
    with torch.no_grad():
        ref.weight.normal_()
        conv.weight.copy_(ref.weight * 5 + 3)
    x = torch.randn(1, 4, 9, 9)
    torch.testing.assert_close(conv(x), ref(x), atol=1e-4, rtol=1e-4)
    plain = torch.nn.functional.conv2d(x, conv.weight)
    assert (plain - conv(x)).abs().max() > 1


@pytest.mark.parametrize("kind,placement", VALID_CELLS + [("sincos_2d", "stem")])
def test_every_position_embedding_on_the_hybrid_stem(kind, placement):
    model = randomize_(small_hybrid(img_size=64, pos_embed={"kind": kind, "placement": placement}))
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    model.resize((96, 64))
    assert model.grid_size == (6, 4)
    assert model(torch.randn(1, 3, 96, 64)).shape == (1, 3)


def test_hybrid_needs_multiple_of_16():
    with pytest.raises(ValueError, match="hybrid stem needs an image size divisible by 16"):
        small_hybrid(img_size=200)


def test_a_hybrid_checkpoint_from_before_same_padding_says_so():
    """Format < 3 hybrids were trained with symmetric padding: loading them warns once."""
    from vitexp.models.factory import config_from_record, model_record

    record = {"format": 2, **model_record(small_hybrid(img_size=64))}
    with pytest.warns(UserWarning, match='earlier symmetric padding; vitexp now pads "SAME"'):
        cfg, _ = config_from_record(record)
    assert cfg.stem == "r50"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_record({**record, "format": 3})
        config_from_record({"format": 2, **model_record(create_model("vit_ti16"))})


def test_a_checkpoint_holding_the_projection_twice_still_loads():
    """Format < 4 hybrids stored the projection twice (patch_embed.proj and, the same
    tensors, patch_embed.embed.proj): it loads strictly into today's model, stored once."""
    model = randomize_(small_hybrid(img_size=64)).eval()
    state = model.state_dict()
    assert not any(".embed.proj." in key for key in state)
    old = {**state, **{k.replace(".proj.", ".embed.proj."): v for k, v in state.items()
                       if k.startswith("patch_embed.proj.")}}  # fmt: skip
    assert len(old) == len(state) + 2
    loaded = small_hybrid(img_size=64).eval()
    loaded.load_state_dict(old)  # strict
    # the optimizer state of a resumed run follows the parameters' order: unchanged
    names = [name for name, _ in model.named_parameters() if name.startswith("patch_embed.")]
    assert names[0].startswith("patch_embed.backbone.root.")
    assert names[-2:] == ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))
