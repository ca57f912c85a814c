"""FlexiViT's patch-size resampling: timm parity, the defining property, PatchEmbed's new
patch size, its refusals, and fine-tuning from a checkpoint of another patch size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed as timm_resample_patch_embed

from test_config import compose_cfg
from test_train import FINETUNE, TINY, train
from vitexp import load_model
from vitexp.config import validate
from vitexp.errors import CheckpointError
from vitexp.models import VisionTransformer
from vitexp.models.factory import model_record
from vitexp.models.hybrid import HybridEmbed
from vitexp.models.patch_embed import PatchEmbed, resample_patch_embed
from vitexp.training.checkpoint import load_pretrained

from conftest import randomize_, tiny_vit

SIZES = [
    ((16, 16), (8, 8)),
    ((16, 16), (24, 24)),
    ((7, 7), (14, 14)),
    ((4, 4), (2, 2)),
    ((16, 16), (8, 12)),
]


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The patch resize the kernel is resampled for: bicubic with antialiasing."""
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


@pytest.mark.parametrize("old,new", SIZES)
@pytest.mark.parametrize("interpolation,antialias", [("bicubic", True), ("bilinear", False)])
def test_resample_matches_timm(old, new, interpolation, antialias):
    weight = torch.randn(16, 3, *old) * 0.05  # a trained kernel's scale
    got = resample_patch_embed(weight, new, interpolation, antialias)
    want = timm_resample_patch_embed(weight, list(new), interpolation, antialias)
    assert got.shape == (16, 3, *new) and got.dtype == weight.dtype
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_resample_keeps_the_dtype_and_the_same_size():
    weight = torch.randn(8, 3, 16, 16, dtype=torch.bfloat16)
    assert resample_patch_embed(weight, 8).dtype == torch.bfloat16
    assert resample_patch_embed(weight, (16, 16)) is weight


@pytest.mark.parametrize("old,new", [((8, 8), (16, 16)), ((7, 7), (14, 14)), ((4, 4), (6, 10))])
def test_an_upsampled_patch_gives_the_same_token(old, new):
    """<x, w> == <resize(x), w'>: the property that defines the resampled kernel."""
    patches = torch.randn(64, 3, *old, dtype=torch.float64)
    weight = torch.randn(10, 3, *old, dtype=torch.float64)
    tokens = F.conv2d(patches, weight).flatten(1)  # (64, 10)
    resampled = F.conv2d(resize(patches, new), resample_patch_embed(weight, new)).flatten(1)
    torch.testing.assert_close(resampled, tokens, atol=1e-8, rtol=1e-8)
    # resizing the kernel like an image does not keep the token
    naive = F.conv2d(resize(patches, new), resize(weight, new)).flatten(1)
    assert (naive - tokens).abs().max() > 1.0


def test_set_patch_size_changes_the_grid():
    embed = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    weight, bias = embed.proj.weight.clone(), embed.proj.bias.clone()
    with pytest.raises(ValueError, match="image height 32 does not tile into patches of 5"):
        embed.set_patch_size(5)
    assert embed.patch_size == (8, 8) and torch.equal(embed.proj.weight, weight)  # unchanged
    embed.set_patch_size(4)
    assert embed.patch_size == embed.stride == embed.proj.stride == (4, 4)
    assert embed.grid_size == (8, 8) and embed.num_patches == 64
    torch.testing.assert_close(embed.proj.weight, resample_patch_embed(weight, 4))
    assert torch.equal(embed.proj.bias, bias)
    assert embed(torch.randn(2, 3, 32, 32)).shape == (2, 64, 16)


def test_a_resized_model_runs_at_the_new_patch_size():
    model = randomize_(tiny_vit(pos_embed="learned_2d")).eval()
    weight = model.patch_embed.proj.weight.clone()
    model.resize(48, patch_size=4)
    assert model.grid_size == (12, 12) and model.cfg.patch_size == 4
    assert model.cfg.patch_stride is None and model.cfg.img_size == (48, 48)
    torch.testing.assert_close(model.patch_embed.proj.weight, resample_patch_embed(weight, 4))
    logits = model(torch.randn(2, 3, 48, 48))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_overlapping_patches_and_the_hybrid_refuse_another_patch_size():
    overlapping = PatchEmbed(img_size=32, patch_size=8, patch_stride=4, embed_dim=16)
    with pytest.raises(ValueError, match=r"patch_stride=\(4, 4\) differs from patch_size"):
        overlapping.set_patch_size(4)
    assert overlapping.proj.weight.shape[-2:] == (8, 8)
    hybrid = HybridEmbed(img_size=32, embed_dim=16)
    with pytest.raises(ValueError, match=r"hybrid \(stem=r50\) has 1x1 patches .* cannot change"):
        hybrid.set_patch_size(2)


def save(model: VisionTransformer, path: Path) -> Path:
    state = {"net." + k: v for k, v in model.state_dict().items()}
    torch.save({"vitexp": model_record(model), "state_dict": state}, path)
    return path


def test_load_pretrained_resamples_non_overlapping_patches_only(tmp_path: Path):
    source = randomize_(tiny_vit())
    path = save(source, tmp_path / "p8.ckpt")
    target = tiny_vit(img_size=48, patch_size=4)
    load_pretrained(path, target)
    want = resample_patch_embed(source.patch_embed.proj.weight, 4)
    torch.testing.assert_close(target.patch_embed.proj.weight, want)
    torch.testing.assert_close(
        target.encoder.blocks[1].mlp.fc1.weight, source.encoder.blocks[1].mlp.fc1.weight
    )
    # an overlapping checkpoint, or an overlapping fine-tune, keeps its patch size
    path = save(tiny_vit(patch_stride=4), tmp_path / "p8s4.ckpt")
    with pytest.raises(CheckpointError, match=r"model\.patch_size=8 but .*only non-overlapping"):
        load_pretrained(path, tiny_vit(patch_size=4))
    path = tmp_path / "p8.ckpt"
    with pytest.raises(CheckpointError, match=r"model\.patch_size=8 but .*only non-overlapping"):
        load_pretrained(path, tiny_vit(img_size=36, patch_size=6, patch_stride=3))


@pytest.mark.slow
def test_finetune_at_half_the_patch_size(tmp_path: Path):
    train(tmp_path / "pre", "+experiment=quickstart_pretrain", *TINY, "trainer.max_steps=2")
    ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    smaller = [*FINETUNE, "model=vit_tiny_p8", "model.patch_size=4", f"pretrained={ckpt}"]
    results = train(tmp_path / "ft", *smaller, "trainer.max_steps=2")
    assert results["steps"] == 2 and results["pretrained"] == str(ckpt)
    assert load_model(results["checkpoint"]).grid_size == (12, 12)  # 48 px / 4 px patches
    log = (tmp_path / "ft" / "train.log").read_text()
    assert log.count("pretrained patch embedding resampled from 8x8 to 4x4 (FlexiViT") == 1
    # the fine-tune's starting point: the pretrained kernel, resampled
    target = VisionTransformer(validate(compose_cfg([*TINY, *smaller])).model, num_classes=10)
    load_pretrained(ckpt, target)
    kernel = torch.load(ckpt, weights_only=True)["state_dict"]["net.patch_embed.proj.weight"]
    assert kernel.shape[-2:] == (8, 8)
    want = resample_patch_embed(kernel, 4)
    torch.testing.assert_close(target.patch_embed.proj.weight, want, atol=0, rtol=0)
