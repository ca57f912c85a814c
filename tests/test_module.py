"""ViTModule: loss, parameter groups, schedule, checkpoint metadata."""

from __future__ import annotations

import math

import pytest
import torch

from vitexp.config import LossConfig, OptimConfig, ScheduleConfig
from vitexp.models import VisionTransformer
from vitexp.models.factory import config_from_record
from vitexp.training.module import ViTModule, lr_lambda, sigmoid_cross_entropy

from conftest import randomize_, tiny_vit


def make_module(loss="softmax", smoothing=0.0, **model_kwargs) -> ViTModule:
    net = randomize_(tiny_vit(**model_kwargs))
    return ViTModule(
        net,
        OptimConfig(weight_decay=0.1),
        ScheduleConfig(),
        LossConfig(loss, smoothing),
        meta={"stage": "pretrain", "data": "shapes"},
    )


def test_parameter_groups_skip_norms_biases_and_embeddings():
    module = make_module(pos_embed={"kind": "learned_2d", "placement": "every_layer"})
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.net.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "head.weight" in decayed
    assert "patch_embed.proj.weight" in decayed
    for name in (
        "cls_token",
        "encoder.pos_embeds.1.x_embed",
        "encoder.pos_embeds.0.y_embed",
        "encoder.blocks.0.norm1.weight",
        "encoder.blocks.0.attn.qkv.bias",
    ):
        assert name in skipped
    assert decayed.isdisjoint(skipped)
    assert len(decayed) + len(skipped) == len(names)


def test_relative_tables_get_no_weight_decay():
    decay, no_decay = make_module(pos_embed="relative").parameter_groups()
    assert not any(p.shape == (31, 8) for p in decay["params"])  # (2N-1, head_dim) tables
    assert sum(p.shape == (31, 8) for p in no_decay["params"]) == 2


def test_losses():
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 4])
    module = make_module()
    torch.testing.assert_close(
        module.loss_fn(logits, labels), torch.nn.functional.cross_entropy(logits, labels)
    )
    smooth = make_module(smoothing=0.1)
    assert smooth.loss_fn(logits, labels) != module.loss_fn(logits, labels)
    sig = make_module(loss="sigmoid")
    onehot = torch.nn.functional.one_hot(labels, 5).float()
    # independent sigmoid per class, summed over classes, averaged over the batch
    expected = (
        -(
            onehot * torch.log(torch.sigmoid(logits))
            + (1 - onehot) * torch.log(1 - torch.sigmoid(logits))
        )
        .sum(1)
        .mean()
    )
    torch.testing.assert_close(sig.loss_fn(logits, labels), expected)
    torch.testing.assert_close(sigmoid_cross_entropy(logits, onehot), expected)


def test_schedule_warmup_then_decay():
    f = lambda step, name: lr_lambda(step, 110, 10, name, 0.0)  # noqa: E731
    assert [round(f(s, "warmup_cosine"), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10, "warmup_cosine") == 1.0 and f(10, "warmup_linear") == 1.0
    assert math.isclose(f(60, "warmup_cosine"), 0.5) and math.isclose(f(60, "warmup_linear"), 0.5)
    assert math.isclose(f(35, "warmup_cosine"), 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110, "warmup_linear") == 0.0 and f(500, "warmup_cosine") == 0.0
    assert lr_lambda(100, 110, 10, "warmup_linear", 0.1) == pytest.approx(0.1 + 0.9 * 0.1)
    assert lr_lambda(50, 110, 10, "constant", 0.0) == 1.0
    assert lr_lambda(0, 5, 100, "warmup_cosine", 0.0) == 0.25  # warmup clipped to the run


def test_nan_loss_stops_with_the_step():
    module = make_module()
    with torch.no_grad():
        module.net.head.weight.fill_(float("nan"))
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    module.training_step(batch, 0)  # recorded, not checked: checking would wait for the GPU
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 0 \(epoch 0\)"):
        module.raise_if_diverged()
    module.raise_if_diverged()  # reported once; nothing left to check


def test_training_step_never_waits_for_the_device(monkeypatch):
    """No host-device sync per step: reading a tensor's value (item, bool, float) fails."""
    module = make_module()
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))

    def sync(*args):
        raise AssertionError("training_step read a tensor's value")

    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "__float__", "tolist"):
            m.setattr(torch.Tensor, name, sync)
        for step in range(3):
            module.training_step(batch, step)
    module.raise_if_diverged()  # all finite: no error
    with torch.no_grad():
        module.net.head.bias.fill_(float("inf"))
    module.training_step(batch, 3)
    module.training_step(batch, 4)
    with pytest.raises(FloatingPointError, match=r"training loss is (nan|inf) at step 0"):
        module.raise_if_diverged()
    with pytest.raises(FloatingPointError):  # a checkpoint of a diverged state is refused
        module.training_step(batch, 5)
        module.on_save_checkpoint({})


def test_checkpoint_records_how_to_rebuild():
    module = make_module(pos_embed={"kind": "learned_2d", "placement": "every_layer"}, pool="gap")
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    meta = checkpoint["vitexp"]
    cfg, num_classes = config_from_record(meta)
    rebuilt = VisionTransformer(cfg, num_classes=num_classes)
    assert rebuilt.grid_size == (4, 4) and rebuilt.num_prefix_tokens == 0
    assert rebuilt.load_state_dict(module.net.state_dict()) is not None  # same shapes
    assert meta["model_config"]["pos_embed"]["placement"] == "every_layer"
    assert meta["stage"] == "pretrain" and meta["data"] == "shapes"
    state = torch.get_rng_state()
    torch.rand(3)
    module.on_load_checkpoint({"rng": {"cpu": state}})
    assert torch.equal(torch.get_rng_state(), state)


def test_compiled_forward_keeps_plain_state_dict():
    net = tiny_vit()
    module = ViTModule(net, OptimConfig(), ScheduleConfig(), LossConfig(), compile=True)
    assert not any("_orig_mod" in k for k in module.state_dict())
    assert set(module.state_dict()) == {f"net.{k}" for k in net.state_dict()}
