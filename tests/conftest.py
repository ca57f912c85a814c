"""Shared test helpers: tiny models, deterministic seeds, no downloads."""

from __future__ import annotations

import os

import pytest
import torch

from vitexp.models import VisionTransformer

VALID_CELLS = [
    ("none", "stem"),
    ("learned_1d", "stem"),
    ("learned_1d", "every_layer"),
    ("learned_1d", "every_layer_shared"),
    ("learned_2d", "stem"),
    ("learned_2d", "every_layer"),
    ("learned_2d", "every_layer_shared"),
    ("relative", "stem"),
]


def _share_the_cores_between_xdist_workers() -> None:
    """Under pytest-xdist (`make test` runs one worker per core) each worker, and every run
    it starts, gets its share of the cores: oversubscribed torch threads only spin."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


_share_the_cores_between_xdist_workers()

NA_CELLS = [
    ("none", "every_layer"),
    ("none", "every_layer_shared"),
    ("relative", "every_layer"),
    ("relative", "every_layer_shared"),
]

# the encodings after the paper: each acts inside the blocks, so at placement=stem only
MODERN_CELLS = [
    ("rope_axial", "stem"),
    ("rope_mixed", "stem"),
    ("rope_axial_ape", "stem"),
    ("rope_mixed_ape", "stem"),
    ("relative_2d", "stem"),
    ("conditional", "stem"),
]


def tiny_vit(**overrides) -> VisionTransformer:
    """A 2-layer ViT on 32 px images with 8 px patches (16 tokens + class token)."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)


def randomize_(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so that zero-initialised parts (head) matter too."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> dict:
    """results.json of the short run (run_helpers.RUN) that nothing interrupts: what every
    killed-and-resumed run must end with."""
    from run_helpers import finish, results, start

    run_dir = tmp_path_factory.mktemp("whole") / "whole"
    finish(start(run_dir))
    return results(run_dir)


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """Hugging Face datasets with no hub access and a private cache."""
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    # datasets waits 5 s after a multi-shard stream ends (an Arrow thread-shutdown workaround)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
