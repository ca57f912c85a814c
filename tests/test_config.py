"""Configs: every preset composes and validates; bad input gives one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from vitexp.config import CONFIG_DIR, register_configs, validate
from vitexp.models import SIZES, build_model, create_model, model_config
from vitexp.training.cli import one_line

register_configs()
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
MODELS = sorted(SIZES)
REPO = Path(CONFIG_DIR).parent


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def error_line(overrides: list[str]) -> str:
    """The one line a user would see for these overrides ('' if they are valid)."""
    try:
        validate(compose_cfg(overrides))
    except Exception as err:  # noqa: BLE001 - every error must become one line
        return one_line(err)
    return ""


def test_presets_exist():
    assert {"quickstart_pretrain", "quickstart_finetune", "quickstart_scratch"} <= set(EXPERIMENTS)
    assert {"pretrain_in1k", "pretrain_in21k", "pretrain_jft", "finetune_in1k"} <= set(EXPERIMENTS)
    assert {"finetune_cifar10", "finetune_cifar100"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_composes_and_validates(experiment):
    given = ["pretrained=weights.safetensors"] if experiment == "finetune_vith14_518" else []
    cfg = validate(compose_cfg([f"+experiment={experiment}", *given]))
    assert cfg.name and cfg.stage in ("pretrain", "finetune")
    if cfg.stage == "finetune":
        assert cfg.pretrained


@pytest.mark.parametrize(
    "overrides",
    [
        ["model/pos_embed=learned_2d"],
        ["model.pos_embed.kind=relative"],
        ["+experiment=ablation_posemb"],
    ],
)
def test_a_size_keeps_its_init_std_under_a_pos_embed_override(overrides):
    cfg = validate(compose_cfg(["model=vit_tiny_p8", *overrides]))
    assert cfg.model.pos_embed.init_std == 0.125
    assert (
        validate(compose_cfg(["model=vit_tiny_debug", *overrides[:1]])).model.pos_embed.init_std
        == 0.02
    )


@pytest.mark.parametrize("model", MODELS)
def test_every_size_is_a_model_choice(model):
    """The sizes table is the one list: `model=NAME` composes to `model_config(NAME)`."""
    cfg = validate(compose_cfg([f"model={model}"]))
    assert cfg.model == model_config(model)
    with torch.device("meta"):
        from_config = build_model(cfg.model, num_classes=10)
        by_name = create_model(model, num_classes=10)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(from_config) == count(by_name)
    assert from_config.grid_size == by_name.grid_size


def test_paper_presets_use_the_papers_hyper_parameters():
    c = validate(compose_cfg(["+experiment=pretrain_in21k"]))
    assert (c.model.name, c.optim.name, c.optim.lr, c.optim.weight_decay) == (
        "vit_b16",
        "adamw",
        1e-3,
        0.03,
    )
    assert (c.optim.beta2, c.data.global_batch_size, c.schedule.warmup_steps) == (
        0.999,
        4096,
        10_000,
    )
    # 90 epochs of 14.2M images at batch 4096 (streamed data: the budget is in steps)
    assert (c.schedule.name, c.model.drop_rate, c.trainer.max_steps) == (
        "warmup_linear",
        0.1,
        312_000,
    )
    f = validate(compose_cfg(["+experiment=finetune_in1k"]))
    assert (f.model.img_size, f.optim.name, f.optim.momentum, f.optim.weight_decay) == (
        (384, 384),
        "sgd",
        0.9,
        0.0,
    )
    assert (f.data.global_batch_size, f.schedule.name, f.trainer.gradient_clip_val) == (
        512,
        "warmup_cosine",
        1.0,
    )


def test_bit_presets_follow_the_papers_resnet_recipe():
    """Section 4.1: every model, ResNets included, pretrained with Adam, batch 4096, wd 0.1;
    fine-tuned with SGD momentum at batch 512."""
    p = validate(compose_cfg(["+experiment=pretrain_in21k_bit"]))
    assert (p.model.name, p.optim.name, p.optim.beta2, p.optim.weight_decay) == (
        "bit_r50x1",
        "adamw",
        0.999,
        0.1,
    )
    assert (p.data.global_batch_size, p.loss.name, p.trainer.max_steps) == (
        4096,
        "sigmoid",
        312_000,
    )
    assert validate(compose_cfg(["+experiment=pretrain_in1k_bit"])).trainer.max_epochs == 300
    f = validate(compose_cfg(["+experiment=finetune_in1k_bit"]))
    assert (f.model.name, f.model.img_size, f.optim.name, f.optim.momentum) == (
        "bit_r50x1",
        (384, 384),
        "sgd",
        0.9,
    )
    assert f.data.global_batch_size == 512 and f.pretrained.endswith("pretrain_in21k_bit")
    big = validate(compose_cfg(["+experiment=pretrain_in21k_bit", "model=bit_r152x2"]))
    assert big.model.layers == [3, 8, 36, 3] and big.model.width_factor == 2


BAD_OVERRIDES = [
    (["model.foo=1"], r"^model\.foo is not a key of model"),
    (["data.classes=[Shirt]"], r"^data\.classes=\['Shirt'\] must name at least 2 different"),
    (["data.classes=[1,'1']"], r"^data\.classes=.* must name at least 2 different"),
    (["foo=bar"], r"^foo is not a key of the top level"),
    (["model.depth=abc"], r"^model\.depth='abc': .*could not be converted to Integer"),
    (["optim.lr=fast"], r"^optim\.lr='fast': .*Float"),
    (["model=vit_x"], r"^model=vit_x is not a known option; choose one of .*vit_b16"),
    (["data=mnist"], r"^data=mnist is not a known option; choose one of .*digits"),
    (["+experiment=nope"], r"^experiment=nope is not a known option; choose one of .*quickstart"),
    (
        ["+experiment=pretrain_in21k", "model=bit_r50x1"],
        r"^experiment/pretrain_in21k sets model\.drop_rate, which a BiT model does not have: "
        r"use \+experiment=pretrain_in21k_bit",
    ),
    (["model/pos_embed=fourier"], r"^model/pos_embed=fourier is not a known option; .*relative"),
    (
        ["model/pos_embed=relative", "model.pos_embed.placement=every_layer"],
        r"relative with placement=every_layer is an N/A cell",
    ),
    (
        ["model/pos_embed=none", "model.pos_embed.placement=every_layer_shared"],
        r"none with placement=every_layer_shared is an N/A cell",
    ),
    (["model.pos_embed.kind=learned_3d"], r"pos_embed\.kind='learned_3d' is not one of"),
    (["model.patch_size=5"], r"image height 32 does not tile into patches of 5"),
    (["model.img_size=30"], r"image height 30 does not tile into patches of 4"),
    (["model.img_size=[32]"], r"^model\.img_size=\[32\]: use an int or \[height, width\]"),
    (["model.num_heads=3"], r"embed_dim=64 is not divisible by num_heads=3"),
    (["optim.lr=-0.1"], r"^optim\.lr=-0\.1 must be > 0"),
    (["optim.weight_decay=-1"], r"^optim\.weight_decay=-1\.0 must be >= 0"),
    (["optim=lion"], r"^optim=lion is not a known option"),
    (["stage=finetune"], r"^stage=finetune needs pretrained=PATH"),
    (["stage=eval"], r"^stage='eval' is not allowed; choose one of pretrain, finetune"),
    (["data.batch_size=0"], r"^data\.batch_size=0 must be > 0"),
    (
        ["data.global_batch_size=100", "data.batch_size=64"],
        r"global_batch_size=100 is not a multiple",
    ),
    (["trainer.precision=8"], r"^trainer\.precision='8' is not allowed"),
    (["trainer.max_steps=0"], r"^trainer\.max_steps=0 must be > 0"),
    (["model.pos_embed=foo"], r"^model\.pos_embed='foo': model\.pos_embed is a group of settings"),
    (["data=imagefolder"], r"^data\.root is not set; data\.source=imagefolder reads"),
    (["data=hf"], r"^data\.dataset is not set; data\.source=hf needs it"),
    (["model.drop_rate=1.5"], r"^model\.drop_rate=1\.5 must be in \[0\.0, 1\.0\)"),
    (["loss.name=hinge"], r"^loss\.name='hinge' is not allowed; choose one of softmax, sigmoid"),
    (["model.pool=max"], r"pool='max' is not one of cls, gap"),
    (["data.on_corrupt=ignore"], r"^data\.on_corrupt='ignore' is not allowed; choose one of skip"),
]


@pytest.mark.parametrize("overrides,pattern", BAD_OVERRIDES, ids=lambda v: str(v)[:40])
def test_bad_override_gives_one_line(overrides, pattern):
    import re

    line = error_line(overrides)
    assert "\n" not in line and line, overrides
    assert re.search(pattern, line), line


def _cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "vitexp.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model.foo=1"], "error: model.foo is not a key of model"),
        (["model/pos_embed=relative", "model.pos_embed.placement=every_layer"], "N/A cell"),
        (["optim.lr=-1"], "error: optim.lr=-1.0 must be > 0"),
    ],
)
def test_cli_error_is_one_line_exit_2_no_traceback(tmp_path, args, needle):
    result = _cli(*args, f"output_root={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not any((tmp_path / "out").rglob("*.yaml"))  # nothing written for a bad config


def test_cli_full_error_shows_traceback(tmp_path):
    result = _cli("optim.lr=-1", cwd=tmp_path, env_extra={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_cli_prints_resolved_config(tmp_path):
    result = _cli("--cfg", "job", "+experiment=quickstart_finetune", cwd=REPO)
    assert result.returncode == 0
    assert "stage: finetune" in result.stdout and "img_size: 64" in result.stdout
