"""One loader for every command: `vitexp.load_model` rebuilds a checkpoint's model from the
record it carries, with the weights meant for evaluation, ready for eval."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import vitexp
from vitexp.errors import CheckpointError
from vitexp.models.factory import model_record
from vitexp.training.checkpoint import read_model

from conftest import randomize_, tiny_vit


def save(path: Path, record: dict, state: dict) -> Path:
    torch.save({"vitexp": record, "state_dict": state, "global_step": 3}, path)
    return path


def net_state(model, prefix: str = "net.") -> dict:
    return {prefix + k: v for k, v in model.state_dict().items()}


def test_load_model_rebuilds_the_trained_model(tmp_path: Path):
    model = randomize_(tiny_vit(pos_embed={"kind": "learned_2d", "placement": "every_layer"}))
    model.cfg = replace(model.cfg, mean=[0.1, 0.2, 0.3], std=[0.9, 0.8, 0.7])
    path = save(tmp_path / "last.ckpt", {**model_record(model), "data": "shapes"}, net_state(model))
    loaded = vitexp.load_model(path)
    assert not loaded.training and loaded.cfg == model.cfg and loaded.num_classes == 5
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_a_format_1_record_loads_the_same(tmp_path: Path):
    """Checkpoints written before the model owned its config: num_classes inside the
    config, the normalisation beside it, no family."""
    model = randomize_(tiny_vit(pool="gap"))
    old = {k: v for k, v in asdict(model.cfg).items() if k not in ("name", "mean", "std")}
    record = {"format": 1, "model_config": {**old, "num_classes": 5}}
    record.update(mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2], grid_size=(4, 4))
    record["model_name"] = "vit_tiny_debug"
    loaded = vitexp.load_model(save(tmp_path / "old.ckpt", record, net_state(model)))
    assert loaded.cfg.pool == "gap" and loaded.num_classes == 5
    assert loaded.cfg.name == "vit_tiny_debug"
    assert loaded.cfg.mean == [0.5, 0.4, 0.3] and loaded.cfg.std == [0.2, 0.2, 0.2]
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_a_run_with_a_weight_average_loads_as_the_average(tmp_path: Path):
    """Lightning's weight averaging: `state_dict` holds the average, `current_model_state`
    the trained weights; load_model gives the average."""
    trained, averaged = randomize_(tiny_vit()), randomize_(tiny_vit())
    path = tmp_path / "ema.ckpt"
    torch.save(
        {
            "vitexp": {**model_record(trained), "ema_decay": 0.99},
            "state_dict": net_state(averaged),
            "current_model_state": net_state(trained),
        },
        path,
    )
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(vitexp.load_model(path)(x), averaged.eval()(x), rtol=0, atol=0)


def test_what_is_not_a_model_says_so_in_one_line(tmp_path: Path):
    model = tiny_vit()
    torch.save({"state_dict": net_state(model)}, tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match=r"bare.ckpt is not a vitexp checkpoint"):
        read_model(tmp_path / "bare.ckpt", "pretrained")
    record = model_record(model)
    record["model_config"] = {**record["model_config"], "depth": 3}  # weights of depth 2
    with pytest.raises(CheckpointError, match=r"^checkpoint=.*wrong.ckpt is damaged: "):
        vitexp.load_model(save(tmp_path / "wrong.ckpt", record, net_state(model)))
    record["model_config"] = {**record["model_config"], "depth": 2, "pool": "max"}
    with pytest.raises(CheckpointError, match=r"is damaged: pool='max' is not one of cls, gap"):
        vitexp.load_model(save(tmp_path / "bad.ckpt", record, net_state(model)))
