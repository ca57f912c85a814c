"""Weight import from timm: same logits, weight files, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitexp.models import create_model
from vitexp.models.convert import from_timm, load_timm_weights, read_state_dict

from conftest import randomize_

PARITY_CASES = [
    ("vit_tiny_patch16_224", {}),
    ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False)),
    ("vit_small_patch16_224", {}),
    ("vit_small_patch16_224", dict(global_pool="avg", class_token=False)),
    ("vit_small_patch16_224", dict(global_pool="avg")),  # class token kept, GAP over patches
    ("vit_tiny_patch16_224", dict(no_embed_class=True)),  # DeiT-3 position layout
    ("vit_tiny_patch16_224", dict(img_size=(160, 224), num_classes=10)),
    ("vit_base_patch32_224", dict(img_size=96, depth=2)),
    # the paper's R50 hybrid ("SAME" padding, kernels standardised with eps 1e-8)
    ("vit_base_r50_s16_224", dict(img_size=(64, 48), embed_dim=64, depth=1, num_heads=4)),
]


def _timm(name: str, **kwargs) -> torch.nn.Module:
    return randomize_(timm.create_model(name, pretrained=False, **kwargs), std=0.02).eval()


@pytest.mark.parametrize("name,kwargs", PARITY_CASES)
def test_from_timm_same_logits(name, kwargs):
    ref = _timm(name, **kwargs)
    ours = from_timm(ref)
    x = torch.randn(2, 3, *ref.patch_embed.img_size)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
        feat_diff = (ours.forward_features(x) - ref.forward_features(x)).abs().max().item()
    assert diff <= 1e-5 and feat_diff <= 1e-5


def test_from_timm_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="reg_tokens|num_reg_tokens=4"):
        from_timm(timm.create_model("vit_tiny_patch16_224", reg_tokens=4, pretrained=False))
    with pytest.raises(ValueError, match=r"blocks\.\*\.attn\.q_norm \(LayerNorm\)"):
        from_timm(timm.create_model("vit_tiny_patch16_224", qk_norm=True, pretrained=False))
    # Eva: RoPE-ViT's models convert, EVA-02 (its own attention, 'ij' RoPE grid) does not
    with pytest.raises(ValueError, match="Eva model uses rope_grid_indexing='ij'.*EvaAttention"):
        from_timm(timm.create_model("eva02_tiny_patch14_224", pretrained=False))
    with pytest.raises(ValueError, match="global_pool='map'"):
        from_timm(timm.create_model("vit_tiny_patch16_224", global_pool="map", pretrained=False))
    with pytest.raises(ValueError, match=r"hybrid backbone with layers=\(2, 2, 2, 2\)"):
        from_timm(timm.create_model("vit_small_r26_s32_224", depth=1, pretrained=False))
    with pytest.raises(ValueError, match="a Sequential hybrid backbone"):
        from_timm(timm.create_model("vit_tiny_r_s16_p8_224", depth=1, pretrained=False))


def test_hybrid_weight_file_loads_with_the_same_logits(tmp_path: Path):
    """timm's R50+ViT weights as a file (as published) into `create_model("hybrid_r50_b16")`."""
    size = dict(img_size=64, embed_dim=64, depth=1, num_heads=4, num_classes=3)
    ref = _timm("vit_base_r50_s16_224", **size)
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "m.safetensors")
    )
    ours = load_timm_weights(
        create_model("hybrid_r50_b16", **size), tmp_path / "m.safetensors"
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weight_file_fine_tune_matches_timms_own_loader(tmp_path: Path, suffix):
    """A file saved at 224 loads into a 384 px, 10-class model: the same features as timm's
    own pretrained loader (bicubic antialiased position resampling, head dropped)."""
    ref = _timm("vit_tiny_patch16_224")
    path = tmp_path / f"model{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    ours = load_timm_weights(create_model("vit_ti16", img_size=384, num_classes=10), path).eval()
    timm_ft = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        img_size=384,
        num_classes=10,
    ).eval()
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        diff = (ours.forward_features(x) - timm_ft.forward_features(x)).abs().max().item()
        assert diff <= 1e-5
        assert torch.all(ours(x) == 0)  # fresh zero head for the 10 new classes


def test_weight_file_with_pre_logits(tmp_path: Path):
    """Old in21k files carry the paper's tanh pre-logits layer: kept when the model asks."""
    ref = _timm("vit_tiny_patch16_224", num_classes=21843)
    state = dict(ref.state_dict())
    fc = torch.nn.Linear(192, 192)
    head = torch.nn.Linear(192, 21843)
    state["pre_logits.fc.weight"], state["pre_logits.fc.bias"] = fc.weight, fc.bias
    state["head.weight"], state["head.bias"] = head.weight, head.bias
    path = tmp_path / "jx_vit.pth"
    torch.save({k: v.detach() for k, v in state.items()}, path)

    ours = load_timm_weights(
        create_model("vit_ti16", num_classes=21843, representation_size=192), path
    ).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = head(torch.tanh(fc(ref.forward_features(x)[:, 0])))
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    # fine-tuning drops it, as the paper does
    plain = load_timm_weights(create_model("vit_ti16", num_classes=10), path)
    assert isinstance(plain.pre_logits, torch.nn.Identity)


def test_wrapped_checkpoint_is_unwrapped(tmp_path: Path):
    ref = _timm("vit_tiny_patch16_224")
    path = tmp_path / "ckpt.pth"
    torch.save({"model": ref.state_dict(), "epoch": 3}, path)
    assert set(read_state_dict(path)) == set(ref.state_dict())


def test_architecture_mismatch_is_named(tmp_path: Path):
    path = tmp_path / "small.safetensors"
    save_file(_timm("vit_small_patch16_224").state_dict(), str(path))
    with pytest.raises(
        ValueError,
        match=r"different architecture \(\d+ tensors differ, e.g. .*\(384.*\) vs model \(192",
    ):
        load_timm_weights(create_model("vit_ti16"), path)


def test_truncated_file_is_refused(tmp_path: Path):
    path = tmp_path / "cut.pth"
    torch.save(_timm("vit_tiny_patch16_224").state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"cannot read weights from {path}"):
        load_timm_weights(create_model("vit_ti16"), path)


class _Evil:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"pos_embed": torch.zeros(1), "x": evil}, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="cannot read weights from"):
        load_timm_weights(create_model("vit_ti16"), path)
    assert not marker.exists()


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="weight file /nowhere.pth does not exist"):
        read_state_dict("/nowhere.pth")
