"""BiT ResNet-v2, the paper's CNN baseline: sizes as timm's, same logits after import, the
interface training, few-shot evaluation and fine-tuning use, checkpoints."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import StdConv2d as TimmStdConv2d
from timm.models.resnetv2 import ResNetV2 as TimmResNetV2

from vitexp.errors import CheckpointError
from vitexp.models import BiTConfig, ResNetV2, create_model, hybrid, model_config, resnet
from vitexp.models.convert import from_timm, load_timm_weights
from vitexp.models.factory import config_from_record, model_record
from vitexp.training.checkpoint import (
    check_architecture,
    check_resumable,
    load_pretrained,
    read_model,
)

from conftest import randomize_, tiny_vit


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save(path: Path, model: torch.nn.Module) -> Path:
    """A checkpoint as training writes it: the record and the module's `net.` weights."""
    state = {"net." + k: v for k, v in model.state_dict().items()}
    torch.save({"vitexp": model_record(model), "state_dict": state}, path)
    return path


def tiny_bit(**overrides) -> ResNetV2:
    return randomize_(create_model("bit_tiny_debug", num_classes=10, **overrides))


def timm_bit(**kwargs) -> torch.nn.Module:
    """A small timm BiT (its `resnetv2_*_bit` recipe: fixed stem, WS eps 1e-8)."""
    kwargs = dict(layers=[1, 1], channels=(256, 512), num_classes=5, **kwargs)
    conv = partial(TimmStdConv2d, eps=1e-8)
    return TimmResNetV2(stem_type="fixed", conv_layer=conv, **kwargs)


# --- sizes -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,timm_name",
    [
        ("bit_r50x1", "resnetv2_50x1_bit"),
        ("bit_r101x1", "resnetv2_101x1_bit"),
        ("bit_r152x2", "resnetv2_152x2_bit"),
    ],
)
def test_parameter_count_is_timms(name, timm_name):
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000)
        ref = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    assert count(ours) == count(ref)


def test_paper_defaults():
    cfg = model_config("bit_r50x1")
    assert (cfg.img_size, cfg.layers, cfg.width, cfg.width_factor) == (
        (224, 224),
        [3, 4, 6, 3],
        64,
        1,
    )
    assert cfg.mean == [0.5, 0.5, 0.5] and cfg.std == [0.5, 0.5, 0.5]
    with torch.device("meta"):
        model = create_model("bit_r50x1")
    assert model.grid_size == (7, 7) and model.num_features == 2048


def test_debug_size_is_about_the_vit_debug_size():
    bit, vit = count(create_model("bit_tiny_debug", num_classes=10)), 208_074
    assert count(create_model("vit_tiny_debug", num_classes=10)) == vit
    assert abs(bit - vit) / vit < 0.3


# --- forward -----------------------------------------------------------------------------
def test_forward_on_32px_images():
    model = tiny_bit()
    assert model.img_size == (32, 32) and model.grid_size == (4, 4)
    x = torch.randn(3, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (3, model.num_features, 4, 4) and features.min() >= 0  # GN + ReLU
    assert model.forward_head(features, pre_logits=True).shape == (3, model.num_features)
    logits = model(x)
    assert logits.shape == (3, 10)
    logits.sum().backward()
    assert model.stem.conv.weight.grad.abs().sum() > 0
    assert model.no_weight_decay() == set()


@pytest.mark.parametrize("layers,size,grid", [([1], 32, (8, 8)), ([1, 1, 1, 1], 32, (1, 1))])
def test_the_last_map_never_vanishes(layers, size, grid):
    model = ResNetV2(layers=layers, width=32, img_size=size, num_classes=2)
    assert model.grid_size == grid
    assert model.forward_features(torch.randn(1, 3, size, size)).shape[2:] == grid


def test_blocks_are_shared_with_the_hybrid():
    assert isinstance(hybrid.ResNetStages().root[0], resnet.StdConv2d)
    block = tiny_bit().stages[1][0]
    assert isinstance(block, resnet.PreActBottleneck) and block.conv2.stride == (2, 2)
    assert isinstance(hybrid.ResNetStages().stages[0][0], resnet.Bottleneck)


# --- timm --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=7),
        lambda: timm_bit(width_factor=2),
    ],
    ids=["resnetv2_50x1_bit", "x2"],
)
def test_from_timm_same_logits(make):
    ref = randomize_(make()).eval()
    ours = from_timm(ref)
    assert isinstance(ours, ResNetV2) and not ours.training
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
        feats = ours.forward_head(ours.forward_features(x), pre_logits=True)
        ref_feats = ref.forward_head(ref.forward_features(x), pre_logits=True)
    assert diff <= 1e-4 and (feats - ref_feats).abs().max().item() <= 1e-4


def test_from_timm_config():
    cfg = from_timm(timm_bit(width_factor=2)).cfg
    assert (cfg.layers, cfg.width, cfg.width_factor) == ([1, 1], 64, 2)


def test_from_timm_refuses_other_resnets():
    with pytest.raises(ValueError, match="BatchNormAct2d"):
        from_timm(timm.create_model("resnetv2_50", pretrained=False))
    with pytest.raises(ValueError, match="global_pool='max'"):
        from_timm(timm_bit(global_pool="max"))
    with pytest.raises(ValueError, match="DownsampleAvg"):
        from_timm(timm_bit(avg_down=True))


def test_timm_weight_file_fine_tune(tmp_path: Path):
    """A timm BiT weight file loads into a BiT with another class count: body kept, head
    left zero."""
    ref = randomize_(timm_bit(width_factor=2)).eval()
    path = tmp_path / "bit.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = load_timm_weights(ResNetV2(layers=[1, 1], width_factor=2, num_classes=3), path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.eval().forward_head(model.forward_features(x), pre_logits=True)
        theirs = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert (ours - theirs).abs().max().item() <= 1e-4
        assert model(x).abs().max() == 0


# --- config ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields,key",
    [
        (dict(width_factor=0), "width_factor"),
        (dict(width=0), "width"),
        (dict(width=48), "width"),  # GroupNorm(32)
        (dict(layers=[]), "layers"),
        (dict(layers=[2, 0]), "layers"),
        (dict(in_chans=0), "in_chans"),
        (dict(img_size="big"), "img_size"),
        (dict(img_size=0), "img_size"),
        (dict(in_chans=1), "mean/std"),
    ],
)
def test_config_rejects_bad_values(fields, key):
    with pytest.raises(ValueError, match=key):
        BiTConfig(**fields)


# --- fine-tuning -------------------------------------------------------------------------
def test_reset_classifier_gives_zero_logits():
    model = tiny_bit()
    model.reset_classifier(4)
    assert model.num_classes == 4 and model.head.out_features == 4
    assert torch.equal(model(torch.randn(2, 3, 32, 32)), torch.zeros(2, 4))


def test_resize_keeps_the_weights():
    model = tiny_bit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.resize(64)
    assert model.cfg.img_size == (64, 64) and model.img_size == (64, 64)
    assert model.grid_size == (8, 8)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


# --- checkpoints -------------------------------------------------------------------------
def test_record_round_trip_and_read_model(tmp_path: Path):
    model = tiny_bit()
    model.cfg = replace(model.cfg, mean=[0.1, 0.2, 0.3])
    record = model_record(model)
    assert record["model_family"] == "bit"
    cfg, num_classes = config_from_record(record)
    assert cfg == model.cfg and num_classes == 10
    loaded, meta = read_model(save(tmp_path / "last.ckpt", model))
    assert isinstance(loaded, ResNetV2) and not loaded.training and loaded.cfg == model.cfg
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_load_pretrained_at_another_resolution_and_class_count(tmp_path: Path):
    source = tiny_bit()
    path = save(tmp_path / "pretrained.ckpt", source)
    model = create_model("bit_tiny_debug", num_classes=3, img_size=48)
    load_pretrained(path, model)
    assert model.img_size == (48, 48) and model.num_classes == 3
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    mine = model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in body.items())
    assert torch.equal(model(torch.randn(2, 3, 48, 48)), torch.zeros(2, 3))


def test_a_vit_checkpoint_does_not_fine_tune_a_bit(tmp_path: Path):
    vit = tiny_vit()
    path = save(tmp_path / "vit.ckpt", vit)
    model = create_model("bit_tiny_debug", num_classes=3)
    with pytest.raises(CheckpointError) as err:
        check_architecture(vit.cfg, model, path)
    message = str(err.value)
    assert "model.family=vit" in message and "model.family=bit" in message
    assert "\n" not in message
    with pytest.raises(CheckpointError, match="model.family=vit"):
        load_pretrained(path, model)


def test_another_bit_architecture_is_refused(tmp_path: Path):
    source = tiny_bit()
    model = create_model("bit_tiny_debug", num_classes=10, layers=[2, 3])
    with pytest.raises(CheckpointError, match=r"model\.layers=\[2, 2\].*model\.layers=\[2, 3\]"):
        check_architecture(source.cfg, model, tmp_path / "x.ckpt")
    resized = create_model("bit_tiny_debug", num_classes=10, img_size=48)
    with pytest.raises(CheckpointError, match=r"model\.img_size"):
        check_resumable(model_record(source), resized, tmp_path / "x.ckpt")
    check_resumable(model_record(source), tiny_bit(), tmp_path / "x.ckpt")


# --- training and few-shot use -----------------------------------------------------------
def test_training_and_few_shot_interfaces():
    from torch.utils.data import TensorDataset

    from vitexp.analysis.fewshot import pre_logits
    from vitexp.config import LossConfig, OptimConfig, ScheduleConfig
    from vitexp.training.module import ViTModule

    model = tiny_bit()
    module = ViTModule(model, OptimConfig(), ScheduleConfig(), LossConfig())
    decay, no_decay = module.parameter_groups()
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    assert len(no_decay["params"]) == sum(p.ndim == 1 for p in model.parameters())
    data = TensorDataset(torch.randn(5, 3, 32, 32), torch.zeros(5, dtype=torch.long))
    assert pre_logits(model, data, [4, 0, 2], batch_size=2).shape == (3, model.num_features)


# --- the same training loop, few-shot, checkpoints and fine-tuning as the ViTs --------------
def bit_run() -> list[str]:
    """test_train's tiny shapes run with the BiT debug model and a quick few-shot."""
    from test_train import TINY

    vit_only = ("model.", "figures=")
    return [o for o in TINY if not o.startswith(vit_only)] + [
        "model=bit_tiny_debug",
        "fewshot.shots=[1,5]",
        "fewshot.report_shot=5",
        "fewshot.draws=1",
        "fewshot.max_test=100",
    ]


@pytest.mark.slow
def test_bit_pretrains_evaluates_and_fine_tunes_like_a_vit(tmp_path, caplog):
    import json
    import logging
    import subprocess
    import sys

    from test_config import compose_cfg
    from vitexp import load_model
    from vitexp.train import run

    caplog.set_level(logging.INFO, logger="vitexp")
    pre = tmp_path / "pre"
    results = run(compose_cfg([*bit_run(), f"output_root={tmp_path}"]), hydra_dir=pre)
    assert results["model"] == "bit_tiny_debug" and results["pos_embed"] is None
    assert results["steps"] == 4 and 0 <= results["metrics"]["test/acc"] <= 1
    assert set(results["fewshot"]) >= {"digits/1shot", "digits/5shot"}
    assert not (pre / "figures").exists()  # the paper's figures are of ViTs
    assert "figures: the paper's figures are of ViTs; none for bit_tiny_debug" in caplog.text
    model = load_model(pre / "checkpoints" / "last.ckpt")
    assert model.cfg.name == "bit_tiny_debug" and model.num_classes == 8

    tuned = run(
        compose_cfg(
            [
                *bit_run(),
                f"output_root={tmp_path}",
                "stage=finetune",
                "data=digits",
                "data.num_classes=10",
                "data.num_workers=0",
                "model.img_size=48",
                "optim=sgd",
                f"pretrained={pre}",
            ]
        ),
        hydra_dir=tmp_path / "ft",
    )
    assert tuned["pretrained_data"] == "shapes" and tuned["steps"] == 4
    ft_model = load_model(tuned["checkpoint"])
    assert ft_model.img_size == (48, 48) and ft_model.num_classes == 10

    proc = subprocess.run(
        [sys.executable, "-m", "vitexp.visualize", f"pretrained={pre}/checkpoints/last.ckpt"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: pretrained=")
    assert "drawn for ViT checkpoints only" in proc.stderr
    assert json.loads((pre / "results.json").read_text())["train_images"] == 256


@pytest.mark.slow
def test_bit_presets_pretrain_then_fine_tune_on_cpu(tmp_path):
    """pretrain_in21k_bit -> finetune_in1k_bit, tiny, with the presets' own switches:
    sigmoid loss, accumulation to the global batch, clipping, AdamW then SGD."""
    from test_config import compose_cfg
    from vitexp.train import run

    tiny = [*bit_run(), "trainer=cpu", "model.img_size=32", f"output_root={tmp_path}"]
    tiny += ["data.batch_size=16", "data.global_batch_size=32", "schedule.warmup_steps=1"]
    pre = run(compose_cfg(["+experiment=pretrain_in21k_bit", *tiny]), hydra_dir=tmp_path / "pre")
    assert pre["model"] == "bit_tiny_debug" and pre["global_batch_size"] == 32
    assert pre["steps"] == 4 and pre["train_images"] == 256
    digits = ["data=digits", "data.num_classes=10", "model.img_size=48"]
    tuned = run(
        compose_cfg(
            ["+experiment=finetune_in1k_bit", *tiny, *digits, f"pretrained={tmp_path}/pre"]
        ),
        hydra_dir=tmp_path / "ft",
    )
    assert tuned["pretrained_data"] == "shapes" and tuned["steps"] == 4
    assert 0 <= tuned["metrics"]["test/acc"] <= 1
