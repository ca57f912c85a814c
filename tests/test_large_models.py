"""Large models: activation checkpointing (same results, less memory), trainer=fsdp with
full and sharded checkpoints (on 2 CPU processes with gloo), and the ViT-H/14 518 px preset."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from run_helpers import finish
from test_config import compose_cfg, error_line
from vitexp.config import validate
from vitexp.errors import CheckpointError
from vitexp.models import VisionTransformer, ViTConfig, build_model
from vitexp.models.factory import config_from_record, model_record
from vitexp.models.resnet import PreActBottleneck
from vitexp.models.vit import Block
from vitexp.training.checkpoint import (
    AtomicCheckpointIO,
    load_pretrained,
    read_checkpoint,
    replace_dir,
)
from vitexp.training.rundir import resolve_run_dir
from vitexp.training.trainer import ShardedStrategy, build_strategy, build_trainer

from conftest import randomize_, tiny_vit

DROPOUT = dict(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)


# --- activation checkpointing ------------------------------------------------------------------
def loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 1):
    torch.manual_seed(seed)  # the same dropout masks for both models, if replayed right
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "variant", [dict(pool="cls"), dict(pool="gap"), dict(pos_embed="relative")], ids=str
)
def test_grad_checkpointing_gives_the_same_loss_and_gradients(variant):
    plain = randomize_(tiny_vit(**variant, **DROPOUT)).train()
    checkpointed = tiny_vit(**variant, **DROPOUT, grad_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    loss, grads = loss_and_grads(plain, x, y)
    loss_ck, grads_ck = loss_and_grads(checkpointed, x, y)
    assert torch.allclose(loss, loss_ck, atol=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ck[name], atol=1e-5), name
    # dropout is really on: other masks give another loss, so the masks were replayed
    assert not torch.allclose(loss_and_grads(plain, x, y, seed=2)[0], loss, atol=1e-4)


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def test_grad_checkpointing_keeps_less_and_only_while_training():
    plain, checkpointed = tiny_vit(depth=4), tiny_vit(depth=4, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(16, 3, 32, 32)
    assert saved_bytes(checkpointed.train(), x) < 0.5 * saved_bytes(plain.train(), x)
    assert saved_bytes(checkpointed.eval(), x) == saved_bytes(plain.eval(), x)
    with torch.no_grad():
        assert torch.equal(checkpointed.train()(x[:2]), plain.train()(x[:2]))  # no dropout


def test_grad_checkpointing_is_a_switch_not_architecture(tmp_path: Path):
    assert "grad_checkpointing" not in ViTConfig.RESUME
    c = validate(compose_cfg(["model.grad_checkpointing=true"]))
    net = build_model(c.model, 10)
    assert net.cfg.grad_checkpointing and all(b.grad_checkpointing for b in net.encoder.blocks)
    assert not build_model(validate(compose_cfg([])).model, 10).encoder.blocks[0].grad_checkpointing
    on, off = randomize_(tiny_vit(grad_checkpointing=True)), randomize_(tiny_vit())
    # a checkpoint saved with the switch fine-tunes a model without it, and back (an old
    # checkpoint, from before the switch existed, has no such key)
    old_config = {k: v for k, v in asdict(off.cfg).items() if k != "grad_checkpointing"}
    old_config["num_classes"] = off.num_classes  # format 1 kept it in the config
    for saved, config, target in (
        (on, model_record(on)["model_config"], tiny_vit(num_classes=3)),
        (off, old_config, tiny_vit(num_classes=3, grad_checkpointing=True)),
    ):
        path = tmp_path / "pre.ckpt"
        state = {f"net.{k}": v for k, v in saved.state_dict().items()}
        record = {"model_config": dict(config), "num_classes": saved.num_classes}
        if config is old_config:
            del record["num_classes"]
        torch.save({"vitexp": record, "state_dict": state}, path)
        load_pretrained(path, target)
        fc1 = lambda m: m.encoder.blocks[1].mlp.fc1.weight  # noqa: E731
        assert torch.equal(fc1(target), fc1(saved))
        assert target.cfg.grad_checkpointing != saved.cfg.grad_checkpointing


# --- trainer=fsdp: configuration ---------------------------------------------------------------
FSDP_PRETRAIN = ["trainer=fsdp", "fewshot.enabled=false", "figures=false"]


def test_trainer_fsdp_wraps_each_block_and_writes_full_checkpoints_atomically(tmp_path: Path):
    c = validate(compose_cfg([*FSDP_PRETRAIN, "trainer.accelerator=cpu"]))
    assert (c.trainer.strategy, c.trainer.fsdp_state_dict, c.trainer.compile) == (
        "fsdp",
        "full",
        False,
    )
    trainer = build_trainer(c, tmp_path)
    strategy = trainer.strategy
    assert isinstance(strategy, ShardedStrategy) and strategy._state_dict_type == "full"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert policy._module_classes == {Block, PreActBottleneck}  # one unit per block, any family
    assert isinstance(strategy.checkpoint_io, AtomicCheckpointIO)  # Lightning saves `full` so
    c.trainer.fsdp_state_dict = "sharded"
    assert build_strategy(c.trainer)._state_dict_type == "sharded"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [*FSDP_PRETRAIN, "trainer.fsdp_state_dict=both"],
            r"^trainer\.fsdp_state_dict='both' is not allowed; choose one of full, sharded$",
        ),
        (["trainer=fsdp"], r"^trainer=fsdp shards the weights .*fewshot\.enabled=false"),
        (["trainer=fsdp", "fewshot.enabled=false"], r"^trainer=fsdp shards .*figures=false"),
        (
            [*FSDP_PRETRAIN, "trainer.compile=true"],
            r"^trainer\.compile=true with trainer\.strategy=fsdp.*trainer\.compile=false",
        ),
    ],
)
def test_fsdp_config_errors_are_one_line(overrides, message):
    import re

    assert re.search(message, error_line(overrides)), error_line(overrides)


def test_vith14_518_preset_composes_with_ddp_averaging_and_checkpointing():
    c = validate(compose_cfg(["+experiment=finetune_vith14_518", "pretrained=vith14.npz"]))
    assert (c.stage, c.model.name, c.model.img_size, c.model.patch_size) == (
        "finetune",
        "vit_h14",
        (518, 518),
        14,
    )
    assert c.model.grad_checkpointing and c.trainer.strategy == "ddp" and c.ema.decay == 0.9999
    assert (c.trainer.devices, c.data.batch_size, c.data.global_batch_size) == (8, 64, 512)
    assert (c.optim.name, c.optim.momentum, c.optim.weight_decay) == ("sgd", 0.9, 0.0)
    assert c.optim.lr in (0.003, 0.01, 0.03, 0.06)
    assert (c.schedule.name, c.trainer.gradient_clip_val) == ("warmup_cosine", 1.0)
    # the parameter count that the preset's memory arithmetic starts from
    with torch.device("meta"):
        net = VisionTransformer(c.model, num_classes=1000)
    assert net.num_tokens == 37 * 37 + 1
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 633.5


# --- sharded checkpoints: reading them safely ------------------------------------------------
def write_sharded(path: Path, model: VisionTransformer, extra: dict | None = None) -> None:
    """What Lightning's FSDPStrategy writes, in one process: DCP shards plus meta.pt."""
    state = {
        "model": {f"net.{k}": v for k, v in model.state_dict().items()},
        "optimizer_0": {"param_groups": [{"lr": 0.1, "params": ["net.head.weight"]}]},
        **(extra or {}),
    }
    with warnings.catch_warnings():  # "no process group: saving in one process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=path, no_dist=True)
    meta = {"global_step": 7, "vitexp": {**model_record(model), "data": "shapes"}}
    torch.save(meta, path / "meta.pt")


def test_sharded_checkpoint_reads_like_a_file_and_fine_tunes(tmp_path: Path):
    from vitexp import load_model

    source = randomize_(tiny_vit())
    write_sharded(tmp_path / "last.ckpt", source)
    content = read_checkpoint(tmp_path / "last.ckpt")
    assert content["global_step"] == 7
    expected = {f"net.{k}": v for k, v in source.state_dict().items()}
    assert content["state_dict"].keys() == expected.keys()
    assert all(torch.equal(content["state_dict"][k], v) for k, v in expected.items())
    assert "state_dict" not in read_checkpoint(tmp_path / "last.ckpt", weights=False)
    target = tiny_vit(img_size=48, num_classes=3)
    assert load_pretrained(tmp_path / "last.ckpt", target)["data"] == "shapes"
    assert target.grid_size == (6, 6)
    qkv = lambda m: m.encoder.blocks[0].attn.qkv.weight  # noqa: E731
    assert torch.equal(qkv(target), qkv(source))
    model = load_model(tmp_path / "last.ckpt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), source.eval()(x))


class RunsCode:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_sharded_checkpoint_that_would_run_code_is_refused(tmp_path: Path):
    marker = tmp_path / "ran"
    bad_item = tmp_path / "item.ckpt"  # a pickled object among the optimizer entries
    write_sharded(bad_item, tiny_vit(), {"optimizer_1": {"hook": RunsCode(marker)}})
    bad_metadata = tmp_path / "metadata.ckpt"  # DCP's own index, a plain pickle
    write_sharded(bad_metadata, tiny_vit())
    (bad_metadata / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    # reaching `os` through a module that DCP's classes live in: os.mkdir(marker)
    sneaky = tmp_path / "sneaky.ckpt"
    write_sharded(sneaky, tiny_vit())
    text = lambda v: b"\x8c" + bytes([len(v)]) + v.encode()  # noqa: E731
    call = text("torch.distributed.checkpoint.filesystem") + text("os.mkdir") + b"\x93"
    (sneaky / ".metadata").write_bytes(b"\x80\x04" + call + text(str(marker)) + b"\x85R.")
    for path in (bad_item, bad_metadata, sneaky):
        with pytest.raises(CheckpointError, match="Python objects other than tensors"):
            read_checkpoint(path, "ckpt_path", weights=False)
    assert not marker.exists()


def test_replace_dir_swaps_files_and_directories(tmp_path: Path):
    target = tmp_path / "last.ckpt"
    target.write_text("a full checkpoint")
    for content in ("shards of step 2", "shards of step 4"):
        new = tmp_path / ".last.ckpt.partial"
        new.mkdir()
        (new / "meta.pt").write_text(content)
        replace_dir(new, target)
        assert (target / "meta.pt").read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_resume_finds_a_sharded_last_checkpoint(tmp_path: Path):
    run = tmp_path / "runs" / "first"
    write_sharded(run / "checkpoints" / "last.ckpt", tiny_vit())
    hydra_dir = tmp_path / "runs" / "second"
    c = validate(compose_cfg(["ckpt_path=last"]))
    assert resolve_run_dir(c, hydra_dir) == (run, run / "checkpoints" / "last.ckpt")
    c.ckpt_path = str(run / "checkpoints" / "last.ckpt")
    assert resolve_run_dir(c, hydra_dir) == (run, run / "checkpoints" / "last.ckpt")


# --- trainer=fsdp end to end: 2 CPU processes (gloo) -------------------------------------------
# torch's FSDP runs on CPU when given device_id=cpu, which
# vitexp.training.trainer.ShardedStrategy passes; Lightning's own FSDPStrategy refuses CPU.
FSDP_RUN = [
    *FSDP_PRETRAIN,
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "data=shapes",
    "data.num_classes=8",
    "data.shapes.num_train=128",
    "data.shapes.num_val=32",
    "data.shapes.num_test=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.depth=2",
    "model.embed_dim=32",
    "model.grad_checkpointing=true",
    *(f"model.{k}={v}" for k, v in DROPOUT.items()),  # masks replayed in the recomputation
    "trainer.max_steps=4",
    "trainer.max_epochs=null",
    "trainer.val_check_interval=2",
    "trainer.check_val_every_n_epoch=null",
    "trainer.progress_bar=false",
    "schedule.warmup_steps=1",
]


def train(run_dir: Path, *overrides: str) -> None:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitexp.train", *FSDP_RUN, f"hydra.run.dir={run_dir}", *overrides],
        cwd=run_dir.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    finish(proc)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> dict[str, Path]:
    """The same 4-step pretraining on 2 ranks, saved `full` and `sharded`."""
    root = tmp_path_factory.mktemp("fsdp")
    for fmt in ("full", "sharded"):
        train(root / fmt / "run", f"trainer.fsdp_state_dict={fmt}")
    return {fmt: root / fmt / "run" for fmt in ("full", "sharded")}


@pytest.mark.slow
def test_fsdp_pretrain_writes_full_and_sharded_checkpoints(fsdp_runs):
    full, sharded = (fsdp_runs[f] / "checkpoints" / "last.ckpt" for f in ("full", "sharded"))
    assert full.is_file()
    assert sorted(p.name for p in sharded.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "meta.pt",
    ]
    assert [p.name for p in sharded.parent.iterdir() if p.name.startswith(".")] == []
    for run in fsdp_runs.values():
        results = json.loads((run / "results.json").read_text())
        assert (results["steps"], results["world_size"]) == (4, 2)
    a, b = read_checkpoint(full), read_checkpoint(sharded)
    assert a["global_step"] == b["global_step"] == 4
    # weight decay reaches the weight matrices, not norms, biases or embeddings, under FSDP
    # (the saved groups number parameters in the order of the model's named_parameters)
    groups = a["optimizer_states"][0]["param_groups"]
    decayed = next(g["params"] for g in groups if g["weight_decay"] > 0)
    names = [n for n, _ in VisionTransformer(*config_from_record(a["vitexp"])).named_parameters()]
    assert [names[i] for i in sorted(decayed)] == [
        n for n in names if n.endswith("weight") and ".norm" not in n and "pos_embeds" not in n
    ]
    assert a["vitexp"]["model_config"]["grad_checkpointing"] is True
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # the same training, gathered two ways
        assert torch.equal(value, b["state_dict"][key]), key


@pytest.mark.slow
def test_fsdp_resume_from_last_restores_the_sharded_optimizer_state(fsdp_runs, tmp_path):
    """Both runs continue from step 4 to 6: the same weights only if the sharded checkpoint
    restored the AdamW moments as the full one did."""
    final = {}
    for fmt, run in fsdp_runs.items():
        copy = tmp_path / fmt / "run"
        shutil.copytree(run, copy)
        (copy / "results.json").unlink()
        again = ["ckpt_path=last", "trainer.max_steps=6", f"trainer.fsdp_state_dict={fmt}"]
        train(tmp_path / fmt / "again", *again)  # finds the newest run beside it: the copy
        results = json.loads((copy / "results.json").read_text())
        assert (results["steps"], results["resumed_at_step"]) == (6, 4)
        assert results["run_dir"] == str(copy)
        final[fmt] = read_checkpoint(copy / "checkpoints" / "last.ckpt")
    assert final["sharded"]["global_step"] == 6
    for key, value in final["full"]["state_dict"].items():
        assert torch.equal(value, final["sharded"]["state_dict"][key]), key


@pytest.mark.slow
def test_finetune_from_fsdp_checkpoints_at_a_new_resolution(fsdp_runs, tmp_path):
    from vitexp.fewshot import FewshotCommandConfig, evaluate_checkpoint

    finetune = [
        "stage=finetune",
        "data=digits",
        "data.num_classes=10",
        "model.img_size=48",
        "optim=sgd",
    ]
    for fmt, run in fsdp_runs.items():
        pretrained = run / "checkpoints" / "last.ckpt"
        train(tmp_path / fmt, *finetune, f"pretrained={pretrained}")
        results = json.loads((tmp_path / fmt / "results.json").read_text())
        assert (results["stage"], results["pretrained_data"], results["steps"]) == (
            "finetune",
            "shapes",
            4,
        )
        saved = read_checkpoint(tmp_path / fmt / "checkpoints" / "last.ckpt")
        assert tuple(saved["vitexp"]["model_config"]["img_size"]) == (48, 48)
        assert saved["state_dict"]["net.encoder.pos_embeds.0.weight"].shape[1] == 12 * 12 + 1
    sharded = fsdp_runs["sharded"] / "checkpoints" / "last.ckpt"
    command = FewshotCommandConfig(pretrained=str(sharded))  # vitexp.fewshot
    command.fewshot.shots, command.fewshot.draws = [1], 1
    command.out = str(tmp_path / "fewshot.json")
    assert set(evaluate_checkpoint(command)["accuracy"]) == {"digits/1shot"}
