"""`python -m vitexp.export`: timm's hub format rebuilt by timm itself with the same
logits, TorchScript with the preprocessing, one line for what a format cannot hold, the
average exported where a run kept one, and a model card from the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_train import train
from vitexp.errors import ConfigError
from vitexp.export import ExportCommandConfig, export
from vitexp.models import create_model
from vitexp.models.convert import restandardize
from vitexp.models.factory import model_record
from vitexp.models.resnet import StdConv2d

from conftest import randomize_, tiny_vit

timm = pytest.importorskip("timm")


def save(path: Path, model, **extra) -> Path:
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    record = {**model_record(model), "class_names": [f"c{i}" for i in range(5)], **extra}
    torch.save({"vitexp": record, "state_dict": state}, path)
    return path


@pytest.mark.parametrize(
    "options",
    [
        {},  # class token, learned 1-D at the stem: the paper's
        {"pool": "gap", "fc_norm": True},  # timm's GAP models
        {"img_size": (48, 40), "patch_size": 8, "embed_dim": 48, "num_heads": 3},
    ],
    ids=["cls", "gap_fc_norm", "non_square_48x40"],
)
def test_timm_rebuilds_the_exported_model_with_the_same_logits(tmp_path, options):
    model = randomize_(tiny_vit(**options)).eval()
    export(ExportCommandConfig(str(save(tmp_path / "m.ckpt", model)), str(tmp_path / "out")))
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    explicit = timm.create_model(
        config["architecture"],
        pretrained=True,
        num_classes=config["num_classes"],
        pretrained_cfg_overlay={
            "file": str(tmp_path / "out" / "model.safetensors"),
            "num_classes": config["num_classes"],
        },
        **config["model_args"],
    ).eval()
    x = torch.randn(3, 3, *model.img_size)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(rebuilt(x), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(explicit(x), want, rtol=0, atol=1e-5)
    assert rebuilt.pretrained_cfg["label_names"] == [f"c{i}" for i in range(5)]


@pytest.mark.parametrize(
    "options, timm_class",
    [
        ({"pos_embed": "rope_axial", "layer_scale_init": 1e-5}, "Eva"),
        ({"pos_embed": "rope_mixed"}, "Eva"),
        ({"pos_embed": "rope_mixed_ape"}, "Eva"),  # the class row folds into cls_token
        ({"pos_embed": "rope_axial_ape", "pool": "gap", "class_token": False}, "Eva"),
        ({"pos_embed": "relative_2d"}, "Beit"),
        ({"pos_embed": {"kind": "relative_2d", "shared": True}, "layer_scale_init": 0.1}, "Beit"),
        ({"layer_scale_init": 1e-4}, "VisionTransformer"),
    ],
    ids=[
        "rope_axial_ls",
        "rope_mixed",
        "rope_mixed_ape",
        "rope_axial_ape_gap",
        "rel_2d",
        "rel_2d_shared_ls",
        "learned_1d_ls",
    ],
)
def test_timm_rebuilds_every_kind_it_has_with_the_same_logits(tmp_path, options, timm_class):
    model = randomize_(tiny_vit(**options)).eval()
    with torch.no_grad():  # a key bias must not matter to BEiT (which has none)
        model.encoder.blocks[0].attn.qkv.bias[32:64] += 1.0
    export(ExportCommandConfig(str(save(tmp_path / "m.ckpt", model)), str(tmp_path / "out")))
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert type(rebuilt).__name__ == timm_class
    x = torch.randn(3, 3, *model.img_size)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(rebuilt(x), want, rtol=0, atol=1e-5)
        assert want.std() > 1e-3


def test_relative_2d_without_a_class_token_is_refused(tmp_path):
    ckpt = save(tmp_path / "m.ckpt", tiny_vit(pos_embed="relative_2d", pool="gap"))
    with pytest.raises(ConfigError, match="timm's Beit has no 2-D relative bias without a class"):
        export(ExportCommandConfig(str(ckpt), str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_timm_rebuilds_the_exported_hybrid_with_the_same_logits(tmp_path):
    """The R50 stem as timm's vit_*_r50_*: "SAME" padding, its names, its kernel eps."""
    model = create_model(
        "hybrid_r50_b16", embed_dim=64, depth=1, num_heads=4, num_classes=5, img_size=(64, 48)
    )
    model = randomize_(model).eval()
    export(ExportCommandConfig(str(save(tmp_path / "m.ckpt", model)), str(tmp_path / "out")))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "vit_base_r50_s16_224"
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=1e-5)


def test_restandardize_moves_a_kernel_between_standardisation_eps():
    """timm standardises the hybrid's kernels with eps 1e-8, vitexp with 1e-5: the converted
    kernel gives the same convolution, where the raw kernel does not (small variance)."""
    ours, theirs = (
        StdConv2d(8, 16, 3, bias=False, eps=1e-5),
        StdConv2d(8, 16, 3, bias=False, eps=1e-8),
    )
    with torch.no_grad():
        ours.weight.normal_(std=3e-3)
        theirs.weight.copy_(ours.weight)
        x = torch.randn(2, 8, 9, 9)
        assert (theirs(x) - ours(x)).abs().max() > 1e-2
        theirs.weight.copy_(restandardize(ours.weight, 1e-5, 1e-8))
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "options, named",
    [
        ({"pos_embed": "learned_2d"}, "position embedding learned_2d/stem"),
        (
            {"pos_embed": {"kind": "learned_1d", "placement": "every_layer"}},
            "position embedding learned_1d/every_layer",
        ),
        ({"pos_embed": "relative"}, "position embedding relative/stem"),
        ({"pos_embed": "conditional"}, "position embedding conditional/stem"),
        ({"pos_embed": "sincos_2d"}, "position embedding sincos_2d/stem"),
        ({"representation_size": 16}, "a pre-logits layer"),
    ],
)
def test_what_timm_lacks_is_named_in_one_line_and_nothing_is_written(tmp_path, options, named):
    ckpt = save(tmp_path / "m.ckpt", tiny_vit(**options))
    with pytest.raises(ConfigError, match=f"timm's VisionTransformer has no {named}") as err:
        export(ExportCommandConfig(str(ckpt), str(tmp_path / "out")))
    assert "\n" not in str(err.value) and "format=torchscript" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_weight_average_is_what_is_exported(tmp_path):
    averaged, trained = randomize_(tiny_vit()).eval(), randomize_(tiny_vit()).eval()
    path = save(tmp_path / "ema.ckpt", averaged, ema_decay=0.999)
    content = torch.load(path, weights_only=True)
    content["current_model_state"] = {f"net.{k}": v for k, v in trained.state_dict().items()}
    torch.save(content, path)
    export(ExportCommandConfig(str(path), str(tmp_path / "out")))
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), averaged(x), rtol=0, atol=1e-5)
    assert "the weight average (EMA 0.999)" in (tmp_path / "out" / "README.md").read_text()


def test_torchscript_carries_the_preprocessing(tmp_path):
    model = randomize_(tiny_vit(pos_embed="learned_2d")).eval()  # any variant
    model.cfg.mean, model.cfg.std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    export(
        ExportCommandConfig(
            str(save(tmp_path / "m.ckpt", model)), str(tmp_path / "o"), "torchscript"
        )
    )
    scripted = torch.jit.load(str(tmp_path / "o" / "model.pt"))
    images = torch.rand(2, 3, 45, 37)  # [0, 1], another size
    x = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
    mean, std = (
        torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1),
        torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), model((x - mean) / std), rtol=1e-4, atol=1e-5)


def test_onnx_without_the_package_says_so(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    ckpt = save(tmp_path / "m.ckpt", tiny_vit())
    with pytest.raises(ConfigError, match=r"format=onnx needs the onnx package"):
        export(ExportCommandConfig(str(ckpt), str(tmp_path / "o"), "onnx"))


def test_the_model_card_describes_the_run(tmp_path):
    result = train(
        tmp_path / "run",
        "trainer.max_steps=2",
        "figures=true",
        "fewshot.shots=[1]",
        "fewshot.report_shot=1",
    )
    export(ExportCommandConfig(result["checkpoint"], str(tmp_path / "out")))
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    assert "position embedding: `learned_1d` at `stem`" in card
    assert "trained on: `shapes` (pretrain)" in card
    assert f"test accuracy: {result['metrics']['test/acc']:.4f}" in card
    assert "few-shot digits/1shot" in card and "optimizer `adamw`" in card
    assert "![attention_maps](figures/attention_maps.png)" in card
    assert (tmp_path / "out" / "figures" / "attention_maps.png").is_file()


def test_onnx_carries_the_preprocessing_at_any_input_size(tmp_path):
    """The exported graph, run by onnxruntime (onnx, onnxscript, onnxruntime: dev extras)."""
    import onnxruntime as ort

    from vitexp.export import WithPreprocessing

    model = randomize_(tiny_vit(pos_embed="learned_2d")).eval()
    export(ExportCommandConfig(str(save(tmp_path / "m.ckpt", model)), str(tmp_path / "o"), "onnx"))
    session = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"))
    for shape in [(2, 3, 40, 40), (1, 3, 50, 37)]:
        images = torch.rand(*shape)
        (got,) = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            want = WithPreprocessing(model)(images)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
