"""End-to-end training: pretrain -> fine-tune, every position embedding, resume, guards."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

import vitexp.train
from test_config import compose_cfg
from vitexp import load_model
from vitexp.config import validate
from vitexp.errors import CheckpointError, ConfigError, Interrupted
from vitexp.models import VisionTransformer
from vitexp.models.factory import config_from_record
from vitexp.train import run
from vitexp.training.checkpoint import load_pretrained
from vitexp.training.trainer import build_trainer

from conftest import MODERN_CELLS, VALID_CELLS

TINY = [
    "data=shapes",
    "data.num_classes=8",
    "data.shapes.num_train=256",
    "data.shapes.num_val=32",
    "data.shapes.num_test=32",
    "data.num_workers=0",
    "data.batch_size=32",
    "data.global_batch_size=null",
    "model.depth=2",
    "model.embed_dim=32",
    "trainer.max_steps=4",
    "trainer.max_epochs=null",
    "trainer.val_check_interval=2",
    "trainer.check_val_every_n_epoch=null",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
    "schedule.warmup_steps=1",
    "figures=false",  # drawn once, in the pretraining fixture
]
FINETUNE = [
    "stage=finetune",
    "data=digits",
    "data.num_classes=10",
    "data.num_workers=0",
    "data.batch_size=32",
    "model.img_size=48",
    "optim=sgd",
]


def train(run_dir: Path, *overrides: str) -> dict:
    cfg = compose_cfg([*TINY, f"output_root={run_dir.parent}", *overrides])
    return run(cfg, hydra_dir=run_dir)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A quickstart-shaped pretraining run on shapes (32 px), shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("runs") / "pre"
    train(run_dir, "+experiment=quickstart_pretrain", *TINY, "figures=true")
    return run_dir


def test_pretrain_writes_config_checkpoints_logs_results(pretrained: Path):
    results = json.loads((pretrained / "results.json").read_text())
    assert results["stage"] == "pretrain" and results["data"] == "shapes"
    assert results["steps"] == 4 and 0.0 <= results["metrics"]["test/acc"] <= 1.0
    assert set(results["metrics"]) == {"test/acc", "test/acc_top5", "test/loss"}
    assert results["checkpoint"] == str(pretrained / "checkpoints" / "last.ckpt")
    assert Path(results["best_checkpoint"]).is_file() and results["wall_time_s"] > 0
    assert "model:" in (pretrained / "config.yaml").read_text()
    metrics = (pretrained / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/acc" in metrics
    ckpt = torch.load(pretrained / "checkpoints" / "last.ckpt", weights_only=True)
    model = load_model(pretrained / "checkpoints" / "last.ckpt")
    assert model.grid_size == (4, 4) and model.num_prefix_tokens == 1 and not model.training
    assert ckpt["global_step"] == 4
    # the head's classes, in order, travel with the checkpoint and the results
    from vitexp.data.shapes import class_names

    names = class_names(8)
    assert ckpt["vitexp"]["class_names"] == results["class_names"] == names
    figures = {p.name for p in (pretrained / "figures").iterdir()}
    assert {
        "attention_maps.png",
        "embedding_filters.png",
        "pos_embed_similarity.png",
        "attention_distance.png",
        "figures.json",
    } <= figures


def test_finetune_at_higher_resolution(pretrained: Path, tmp_path: Path):
    ckpt = f"pretrained={pretrained}/checkpoints/last.ckpt"
    results = train(tmp_path / "ft", *FINETUNE, "model=vit_tiny_p8", ckpt)  # the quickstart's
    assert results["stage"] == "finetune" and results["pretrained_data"] == "shapes"
    ckpt = torch.load(Path(results["checkpoint"]), weights_only=True)
    assert load_model(results["checkpoint"]).grid_size == (6, 6)  # 48 px / 8 px patches
    assert ckpt["state_dict"]["net.encoder.pos_embeds.0.weight"].shape == (1, 37, 32)
    assert ckpt["state_dict"]["net.head.weight"].shape == (10, 32)
    digits = [str(d) for d in range(10)]  # the new head's classes, not the pretraining's
    assert ckpt["vitexp"]["class_names"] == results["class_names"] == digits
    # digits: the raw-pixel baselines on the same split, beside the run's own accuracy
    baselines = results["baselines"]
    assert set(baselines) == {"logistic_regression", "rbf_svm"}
    assert 0.9 < baselines["logistic_regression"] < baselines["rbf_svm"] <= 1.0
    log = (tmp_path / "ft" / "train.log").read_text()
    assert "raw-pixel baselines: logistic regression 0.97" in log


CELLS = [*VALID_CELLS, ("sincos_2d", "every_layer"), *MODERN_CELLS]


@pytest.mark.parametrize("kind,placement", CELLS)
def test_finetune_every_position_embedding(tmp_path: Path, kind, placement):
    pos = [f"model/pos_embed={kind}", f"model.pos_embed.placement={placement}"]
    train(tmp_path / "pre", *pos, "trainer.max_steps=2")
    ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    # the fine-tune's starting point: the pretrained body, resampled to 12x12, zero head
    content = torch.load(ckpt, weights_only=True)
    source = VisionTransformer(*config_from_record(content["vitexp"]))
    source.load_state_dict({k[4:]: v for k, v in content["state_dict"].items()})
    source.resize(48)
    cfg = validate(compose_cfg([*TINY, *FINETUNE, *pos, f"pretrained={ckpt}"]))
    target = VisionTransformer(cfg.model, num_classes=10)
    load_pretrained(ckpt, target)
    for (name, want), (_, got) in zip(
        source.named_parameters(), target.named_parameters(), strict=True
    ):
        if not name.startswith("head."):
            torch.testing.assert_close(got, want, msg=name)
    assert torch.all(target.head.weight == 0)
    results = train(tmp_path / "ft", *FINETUNE, *pos, f"pretrained={ckpt}", "trainer.max_steps=2")
    assert results["steps"] == 2


def test_finetune_of_another_architecture_is_refused(pretrained: Path, tmp_path: Path):
    with pytest.raises(
        CheckpointError, match=r"has model\.embed_dim=32 but the config has model\.embed_dim=64"
    ):
        train(
            tmp_path / "ft",
            *FINETUNE,
            "model=vit_tiny_p8",
            "model.embed_dim=64",
            f"pretrained={pretrained}/checkpoints/last.ckpt",
        )
    with pytest.raises(
        CheckpointError,
        match=r"pos_embed\.kind=learned_1d but the config has model\.pos_embed\.kind=learned_2d",
    ):
        train(
            tmp_path / "ft2",
            *FINETUNE,
            "model=vit_tiny_p8",
            "model/pos_embed=learned_2d",
            f"pretrained={pretrained}/checkpoints/last.ckpt",
        )
    assert not (tmp_path / "ft" / "checkpoints").exists()


def test_finetune_from_a_timm_weight_file(tmp_path: Path):
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=4,
        num_classes=7,
    )
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    results = train(tmp_path / "ft", *FINETUNE, f"pretrained={path}", "trainer.max_steps=2")
    assert results["steps"] == 2 and results["pretrained"] == str(path)


def test_a_finished_run_is_never_overwritten(pretrained: Path):
    before = {p: p.stat().st_mtime_ns for p in pretrained.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run .*resume it with ckpt_path=last"):
        train(pretrained)
    after = {p: p.stat().st_mtime_ns for p in pretrained.rglob("*") if p.is_file()}
    assert before == after


def test_resume_last_without_a_run_says_so(tmp_path: Path):
    with pytest.raises(ConfigError, match="ckpt_path=last: no checkpoints/last.ckpt"):
        train(tmp_path / "runs" / "new", "ckpt_path=last")


class SignalDuring(L.Callback):
    """SIGTERM to this process in the middle of training step `step`, or of the validation
    after it (as a cluster sends it; a Ctrl-C takes the same path)."""

    def __init__(self, step: int, validation: bool) -> None:
        self.step, self.validation = step, validation

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if not self.validation and trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx) -> None:
        at = self.validation and not trainer.sanity_checking and trainer.global_step == self.step
        if at and batch_idx == 0:  # the first of two validation batches
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(
    "step, validation", [(3, False), (2, True)], ids=["mid_step", "mid_validation"]
)
def test_a_signal_saves_its_whole_step_then_resumes_exactly(
    tmp_path: Path, monkeypatch, step: int, validation: bool
):
    """The checkpoint saved after a signal holds that step's update of the weight average
    (saved before it, as once, the resumed average missed a step) and, when the signal came
    during a validation, the whole validation and the trained weights (Lightning stopped
    after one validation batch, with the average swapped in); the resumed run equals an
    uninterrupted one (as once it did not, by up to 1e-4)."""
    recipe = [
        "ema.decay=0.9",
        "trainer.max_steps=6",  # validations at steps 2, 4, 6
        "model.drop_path_rate=0.1",
        "data.shapes.num_val=64",  # two validation batches
    ]
    whole = train(tmp_path / "whole", *recipe)
    fewshot = vitexp.train.fewshot_callbacks
    signal_at = SignalDuring(step, validation)
    monkeypatch.setattr(vitexp.train, "fewshot_callbacks", lambda ev: [*fewshot(ev), signal_at])
    with pytest.raises(Interrupted, match=f"at step {step}; .*holds that step"):
        train(tmp_path / "run", *recipe)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == step and int(ckpt["averaging_state"]["n_averaged"]) == step
    if validation:  # both batches of it
        validated = ckpt["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["current"]
        assert validated["completed"] == 2
    monkeypatch.undo()
    resumed = train(tmp_path / "run", *recipe, "ckpt_path=last")
    for key, value in whole["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_global_batch_is_kept_by_accumulation(tmp_path: Path):
    cfg = validate(compose_cfg([*TINY, "data.batch_size=8", "data.global_batch_size=32"]))
    assert build_trainer(cfg, tmp_path).accumulate_grad_batches == 4


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_other_loggers_write_their_files(tmp_path: Path, logger: str, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tmp_path / "run", f"logger={logger}", "trainer.max_steps=2")
    if logger == "tensorboard":
        assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    else:
        run_id = (tmp_path / "run" / "wandb_id.txt").read_text().strip()
        assert list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
