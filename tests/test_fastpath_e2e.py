"""The GPU presets' switches, run end to end on CPU: bf16 autocast, torch.compile, fused
optimizers, gradient clipping and accumulation, then resume, fine-tune at a new resolution
(a recompile), few-shot and figures from the compiled run's checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import FINETUNE, train
from vitexp import load_model
from vitexp.models import VisionTransformer
from vitexp.models.factory import config_from_record
from vitexp.training import module as module_lib

CLIP = 1e-3  # far below the raw gradient norm of these runs: every step is clipped


def _recording_optimizer(norms: list[float]):
    """build_optimizer whose step() records the norm of the gradients it applied (Lightning
    runs the closure, backward and clipping inside step(): a post-hook sees them)."""
    real = module_lib.build_optimizer

    def record(optimizer, args, kwargs) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # fp16 with a fused optimizer: unscaled before clipping, so no scale is left to apply
        assert getattr(optimizer, "grad_scale", None) is None
        norms.append(
            float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))
        )

    def build(groups, o):
        optimizer = real(groups, o)
        optimizer.register_step_post_hook(record)
        return optimizer

    return build


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "optim", "fused"),
    [
        ("32-true", "adamw", True),
        ("bf16-mixed", "adamw", True),  # trainer=gpu: refused by Lightning before the fix
        ("bf16-mixed", "sgd", True),  # the fine-tuning presets
    ],
)
def test_clipping_bounds_every_update(tmp_path: Path, monkeypatch, precision, optim, fused):
    norms: list[float] = []
    monkeypatch.setattr(module_lib, "build_optimizer", _recording_optimizer(norms))
    results = train(
        tmp_path / "run",
        f"trainer.precision={precision}",
        f"optim={optim}",
        f"optim.fused={fused}",
        f"trainer.gradient_clip_val={CLIP}",
        "data.batch_size=16",
        "data.global_batch_size=32",  # accumulation: clipped once per optimizer step
    )
    assert results["steps"] == 4
    assert norms, "no optimizer step ran"  # fp16 may skip an overflowing first step
    assert all(n == pytest.approx(CLIP, rel=1e-2) for n in norms), norms
    metrics = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/grad_norm" in metrics  # the norm before clipping, for the logs


@pytest.mark.parametrize("fused", [True, False])
def test_clipping_with_fp16_loss_scaling(fused: bool, monkeypatch):
    """16-mixed (trainer=auto on a GPU without bf16): Lightning turns it into bf16 on CPU, so
    the fp16 autocast + GradScaler plugin is given explicitly here. A fused optimizer
    unscales inside step(); clipping must unscale first, and clip the true gradients."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision
    from torch.utils.data import DataLoader, TensorDataset

    from vitexp.config import LossConfig, OptimConfig, ScheduleConfig
    from vitexp.training.module import ViTModule

    from conftest import tiny_vit

    norms: list[float] = []
    monkeypatch.setattr(module_lib, "build_optimizer", _recording_optimizer(norms))
    module = ViTModule(
        tiny_vit(), OptimConfig(fused=fused), ScheduleConfig(warmup_steps=0), LossConfig()
    )
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 5, (32,)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
        gradient_clip_val=CLIP,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert norms and all(n == pytest.approx(CLIP, rel=1e-2) for n in norms), norms
    assert scaler.get_scale() >= 2.0**9  # no overflow: the steps were taken, not skipped


def _cli(cwd: Path, module: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory) -> tuple[dict, Path]:
    """`make gpu-check`'s CPU half, its runs kept: (report, work dir). Its pretraining is
    bf16 + compiled + fused + clipped + accumulating; the tests below start from it."""
    work = tmp_path_factory.mktemp("gpu_check")
    out = str(work / "r.json")
    _cli(work, "vitexp.gpu_check", "--keep", str(work / "runs"), "--out", out, timeout=1200)
    return json.loads((work / "r.json").read_text()), work / "runs"


@pytest.mark.slow
def test_gpu_check_cpu_half_verifies_every_switch(gpu_check):
    report, runs = gpu_check
    assert report["passed"] and not report["gpu"]
    checks = {c["name"].split(":")[0].split(" (")[0]: c for c in report["checks"]}
    assert set(checks) == {
        "pretrain",
        "resume from last",
        "fine-tune at 48 px from the compiled checkpoint",
        "DDP step on 2 processes",
        "training-step throughput",
        "loader or step",
    }
    assert checks["resume from last"]["facts"] == {"resumed_at_step": 16, "steps": 20}
    assert checks["DDP step on 2 processes"]["facts"]["backend"] == "gloo"
    assert checks["training-step throughput"]["facts"]["images_per_s"] > 0
    bottleneck = checks["loader or step"]["facts"]  # generated JPEGs, the debug model
    assert bottleneck["bottleneck"] in ("loader", "step") and bottleneck["decode"] == "cpu"
    assert bottleneck["step_images_per_s"] > 0 and bottleneck["loader_images_per_s"] > 0
    assert len(checks["pretrain"]["facts"]["figures"]) == 4
    results = json.loads((runs / "pretrain" / "results.json").read_text())
    assert results["steps"] == 20 and results["global_batch_size"] == 64
    ckpt = torch.load(runs / "pretrain" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])  # plain module names
    assert all(
        v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point()
    )  # bf16 autocast keeps fp32 master weights


@pytest.fixture(scope="module")
def compiled_run(gpu_check) -> Path:
    return gpu_check[1] / "pretrain"


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "compile_"), [("bf16-mixed", False), ("32-true", True)])
def test_finetune_from_a_compiled_checkpoint(
    compiled_run: Path, tmp_path: Path, precision: str, compile_: bool
):
    """From the bf16 compiled run at 48 px: bf16 alone (eager) and compile alone (fp32);
    both switches together is gpu-check's fine-tune."""
    results = train(
        tmp_path / "ft",
        *FINETUNE,
        "model=vit_tiny_debug",  # gpu-check's model
        "model.depth=4",
        "model.embed_dim=64",
        f"trainer.precision={precision}",
        f"trainer.compile={compile_}",
        "trainer.gradient_clip_val=1.0",
        "trainer.max_steps=2",
        f"pretrained={compiled_run}/checkpoints/last.ckpt",
    )
    assert results["steps"] == 2 and results["pretrained_data"] == "shapes"
    assert load_model(results["checkpoint"]).grid_size == (12, 12)


@pytest.mark.slow
def test_compiled_and_eager_modules_share_checkpoints(compiled_run: Path):
    """A compiled run's weights load into an eager model and back, with the same logits."""
    content = torch.load(compiled_run / "checkpoints" / "last.ckpt", weights_only=True)
    state = {k.removeprefix("net."): v for k, v in content["state_dict"].items()}
    rebuild = lambda: VisionTransformer(*config_from_record(content["vitexp"])).eval()  # noqa: E731
    eager = rebuild()
    eager.load_state_dict(state)
    compiled = torch.compile(rebuild())
    compiled._orig_mod.load_state_dict(eager.state_dict())  # into the compiled model ...
    back = rebuild()
    back.load_state_dict(compiled._orig_mod.state_dict())  # ... and back out of it
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(back(x), eager(x), rtol=0, atol=0)


@pytest.mark.slow
def test_fewshot_and_figures_from_a_compiled_checkpoint(compiled_run: Path, tmp_path: Path):
    ckpt = compiled_run / "checkpoints" / "last.ckpt"
    _cli(
        tmp_path,
        "vitexp.fewshot",
        f"pretrained={ckpt}",
        "fewshot.shots=[1,2]",
        "fewshot.max_test=64",
        f"out={tmp_path / 'fewshot.json'}",
    )
    fewshot = json.loads((tmp_path / "fewshot.json").read_text())
    assert fewshot["pretrained"] == str(ckpt)
    _cli(tmp_path, "vitexp.visualize", f"pretrained={ckpt}", f"out={tmp_path / 'fig'}")
    names = {p.name for p in (tmp_path / "fig").iterdir()}
    assert {"attention_maps.png", "attention_distance.png", "figures.json"} <= names
