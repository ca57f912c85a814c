"""Layer-wise learning-rate decay (`optim.layer_decay`, BEiT / MAE / DeiT III fine-tuning):
every parameter's group lr against the formula, for each position-embedding placement, the
hybrid stem and BiT; weight decay still off for norms, biases and embeddings; the config
check; FSDP's wrapped names; and the lrs a short training run reports."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from test_config import compose_cfg, error_line
from vitexp.config import LossConfig, OptimConfig, ScheduleConfig, validate
from vitexp.models import create_model
from vitexp.training.module import ViTModule, lr_lambda

from conftest import randomize_

LR, WD, DECAY = 0.1, 0.05, 0.5


def module_of(net: torch.nn.Module, layer_decay: float | None = DECAY, **optim) -> ViTModule:
    optim = OptimConfig(lr=LR, weight_decay=WD, layer_decay=layer_decay, **optim)
    return ViTModule(net, optim, ScheduleConfig(), LossConfig())


def groups_by_name(module: ViTModule) -> dict[str, dict]:
    """Parameter name -> the one group holding it (checks that there is exactly one)."""
    groups = module.parameter_groups()
    names = {id(p): n for n, p in module.net.named_parameters()}
    found: dict[str, dict] = {}
    for group in groups:
        for p in group["params"]:
            assert names[id(p)] not in found, f"{names[id(p)]} is in two groups"
            found[names[id(p)]] = group
    assert set(found) == set(names.values()), "every parameter is in a group"
    return found


def vit_layer(name: str, depth: int, placement: str) -> int:
    """The layer id the spec gives a ViT parameter, written out from its name."""
    if name == "cls_token" or name.startswith("patch_embed."):
        return 0  # the stem, the hybrid CNN included
    if m := re.match(r"encoder\.blocks\.(\d+)\.", name):
        return int(m[1]) + 1  # block i, its relative-attention table included
    if m := re.match(r"encoder\.pos_embeds\.(\d+)\.", name):
        # a table per layer belongs to its block; the stem's and a shared table to the stem
        return int(m[1]) + 1 if placement == "every_layer" else 0
    assert name.startswith(("encoder.norm.", "fc_norm.", "pre_logits.", "head.")), name
    return depth + 1


def vit_no_decay(name: str, param: torch.Tensor) -> bool:
    embedding = name == "cls_token" or ".pos_embeds." in name or ".rel_pos." in name
    return param.ndim < 2 or embedding


def check_vit(net, placement: str) -> dict[str, dict]:
    depth = net.cfg.depth
    found = groups_by_name(module_of(net))
    for name, param in net.named_parameters():
        group, k = found[name], vit_layer(name, depth, placement)
        scale = DECAY ** (depth + 1 - k)
        assert group["lr_scale"] == pytest.approx(scale), name
        assert group["lr"] == pytest.approx(LR * scale), name
        assert group["weight_decay"] == (0.0 if vit_no_decay(name, param) else WD), name
    # the formula's fixed points, spelled out
    assert found["head.weight"]["lr"] == pytest.approx(LR)
    proj = next(n for n in found if n.startswith("patch_embed.") and n.endswith("proj.weight"))
    assert found[proj]["lr"] == pytest.approx(LR * DECAY ** (depth + 1))
    for i in range(depth):
        assert found[f"encoder.blocks.{i}.mlp.fc1.weight"]["lr"] == pytest.approx(
            LR * DECAY ** (depth - i)
        )
    if net.cls_token is not None:
        assert found["cls_token"]["lr"] == pytest.approx(LR * DECAY ** (depth + 1))
        assert found["cls_token"]["weight_decay"] == 0.0
    assert found["head.bias"]["weight_decay"] == 0.0
    assert found["encoder.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    return found


@pytest.mark.parametrize(
    "pos_embed",
    [
        {"kind": "learned_1d", "placement": "stem"},
        {"kind": "learned_1d", "placement": "every_layer"},
        {"kind": "learned_2d", "placement": "every_layer"},
        {"kind": "learned_1d", "placement": "every_layer_shared"},
        {"kind": "learned_2d", "placement": "every_layer_shared"},
        {"kind": "relative", "placement": "stem"},
    ],
    ids=lambda p: f"{p['kind']}-{p['placement']}",
)
def test_every_vit_parameter_gets_its_layers_lr(pos_embed):
    net = create_model("vit_tiny_debug", num_classes=7, pos_embed=pos_embed)
    found = check_vit(net, pos_embed["placement"])
    depth = net.cfg.depth
    tables = [n for n, _ in net.named_parameters() if ".pos_embeds." in n or ".rel_pos." in n]
    assert tables, "the placement has position parameters to check"
    for name in tables:
        assert found[name]["weight_decay"] == 0.0
    if pos_embed["placement"] == "every_layer":  # the last block's own table
        last = next(n for n in tables if n.startswith(f"encoder.pos_embeds.{depth - 1}."))
        assert found[last]["lr"] == pytest.approx(LR * DECAY)
    elif pos_embed["kind"] != "relative":  # one table, with the stem
        assert all(found[n]["lr"] == pytest.approx(LR * DECAY ** (depth + 1)) for n in tables)


def test_gap_fc_norm_and_pre_logits_train_with_the_head():
    net = create_model(
        "vit_tiny_debug", num_classes=7, pool="gap", fc_norm=True, representation_size=16
    )
    found = check_vit(net, "stem")
    for name in ("fc_norm.weight", "pre_logits.0.weight", "pre_logits.0.bias"):
        assert found[name]["lr"] == pytest.approx(LR)
    assert found["pre_logits.0.weight"]["weight_decay"] == WD


def test_the_hybrid_cnn_stem_is_layer_0():
    with torch.device("meta"):  # the real ResNet-50 stem: names only, nothing allocated
        net = create_model("hybrid_r50_b16", embed_dim=64, depth=2, num_heads=4, num_classes=3)
    found = check_vit(net, "stem")
    stem = [n for n, _ in net.named_parameters() if n.startswith("patch_embed.")]
    assert len(stem) > 50 and all(found[n]["lr"] == pytest.approx(LR * DECAY**3) for n in stem)


def test_every_bit_parameter_gets_its_blocks_lr():
    net = create_model("bit_tiny_debug", num_classes=7)  # stages of 2 and 2 blocks
    top = sum(net.cfg.layers) + 1  # 5: the head
    block_ids = {"stages.0.0.": 1, "stages.0.1.": 2, "stages.1.0.": 3, "stages.1.1.": 4}
    found = groups_by_name(module_of(net))
    for name, param in net.named_parameters():
        if name.startswith("stem."):
            k = 0
        elif name.startswith("stages."):
            k = next(v for prefix, v in block_ids.items() if name.startswith(prefix))
        else:
            assert name.startswith(("norm.", "head.")), name
            k = top
        assert found[name]["lr"] == pytest.approx(LR * DECAY ** (top - k)), name
        assert found[name]["weight_decay"] == (0.0 if param.ndim < 2 else WD), name
    assert found["stem.conv.weight"]["lr"] == pytest.approx(LR * DECAY**5)
    assert found["head.weight"]["lr"] == pytest.approx(LR)
    assert found["stages.1.1.conv3.weight"]["lr"] == pytest.approx(LR * DECAY)


def test_one_group_per_layer_and_decay_flag_and_off_by_default():
    net = create_model("vit_tiny_debug", num_classes=7)
    groups = module_of(net).parameter_groups()
    keys = [(g["lr_scale"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys)) == 2 * (net.cfg.depth + 2)  # each layer has both kinds
    assert all(set(g) >= {"params", "weight_decay", "lr", "lr_scale"} for g in groups)
    plain = module_of(net, layer_decay=None).parameter_groups()  # off: the two groups as before
    assert [g["weight_decay"] for g in plain] == [WD, 0.0]
    assert all("lr" not in g for g in plain)
    assert sum(len(g["params"]) for g in plain) == len(list(net.parameters()))
    same = module_of(net, layer_decay=1.0).parameter_groups()  # 1.0: every group at lr
    assert all(g["lr"] == LR for g in same)


def test_frozen_parameters_stay_out_of_every_group():
    net = create_model("vit_tiny_debug", num_classes=7)
    net.patch_embed.requires_grad_(False)
    params = {id(p) for g in module_of(net).parameter_groups() for p in g["params"]}
    assert id(net.patch_embed.proj.weight) not in params and id(net.head.weight) in params


def test_fsdp_wrapped_names_keep_their_layers(tmp_path: Path):
    """Under trainer=fsdp the optimizer is built after wrapping (one unit per block, names
    carry `_fsdp_wrapped_module.`): the groups must be those of the plain model."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from vitexp.models.vit import Block

    net = create_model("vit_tiny_debug", num_classes=7)
    module = module_of(net)
    plain = {n: (g["lr"], g["weight_decay"]) for n, g in groups_by_name(module).items()}
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        wrapped = FullyShardedDataParallel(
            module,
            auto_wrap_policy=ModuleWrapPolicy({Block}),
            device_id=torch.device("cpu"),
            use_orig_params=True,
        )
        names = [n for n, _ in module.net.named_parameters()]
        assert any("_fsdp_wrapped_module." in n for n in names)
        groups = module.parameter_groups()
        by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
        for name, param in module.net.named_parameters():
            assert by_param[id(param)] == plain[name.replace("_fsdp_wrapped_module.", "")], name
        del wrapped
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("value", [0, 1.5, -0.5])
def test_layer_decay_outside_0_1_is_a_config_error(value):
    line = error_line([f"optim.layer_decay={value}"])
    assert re.match(rf"^optim\.layer_decay={float(value)!r} must be in \(0, 1\]", line), line
    assert "\n" not in line


def test_layer_decay_in_range_validates():
    assert validate(compose_cfg(["optim.layer_decay=0.65"])).optim.layer_decay == 0.65
    assert validate(compose_cfg(["optim.layer_decay=1"])).optim.layer_decay == 1.0
    assert validate(compose_cfg([])).optim.layer_decay is None


def test_a_short_run_reports_each_groups_scaled_lr(tmp_path: Path):
    """Lightning's LearningRateMonitor and the optimizer, after a few steps of warmup and
    cosine decay: every group at lr * its scale * the schedule's factor (LambdaLR scales
    each group from its own initial lr)."""
    torch.manual_seed(0)
    net = randomize_(create_model("vit_tiny_debug", num_classes=4))
    steps, warmup = 5, 2
    module = ViTModule(
        net,
        OptimConfig(lr=LR, weight_decay=WD, layer_decay=DECAY),
        ScheduleConfig(name="warmup_cosine", warmup_steps=warmup, end_lr_ratio=0.0),
        LossConfig(),
    )
    data = TensorDataset(torch.randn(40, 3, 32, 32), torch.randint(0, 4, (40,)))
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="lr")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        callbacks=[L.pytorch.callbacks.LearningRateMonitor(logging_interval="step")],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    factor = lambda step: lr_lambda(step, steps, warmup, "warmup_cosine", 0.0)  # noqa: E731
    optimizer = trainer.optimizers[0]
    assert len(optimizer.param_groups) == 2 * (net.cfg.depth + 2)
    for group in optimizer.param_groups:
        assert group["initial_lr"] == pytest.approx(LR * group["lr_scale"])
        assert group["lr"] == pytest.approx(LR * group["lr_scale"] * factor(steps))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-AdamW/layer5")]
    assert [int(r["step"]) for r in rows] == list(range(steps))
    top = net.cfg.depth + 1
    for row in rows:
        step = int(row["step"])
        for k in range(top + 1):
            for name in (f"layer{k}", f"layer{k}_no_decay"):
                expected = LR * DECAY ** (top - k) * factor(step)
                assert float(row[f"lr-AdamW/{name}"]) == pytest.approx(expected), (step, name)
    head, stem = float(rows[2]["lr-AdamW/layer5"]), float(rows[2]["lr-AdamW/layer0"])
    assert stem == pytest.approx(head * DECAY**top) and head > 0
