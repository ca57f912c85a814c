"""The throughput of a training step: the cases that `vitexp.bench` and `vitexp.gpu_check`
time (`Case`: size, resolution, batch, Table-8 variant; `Setup`: device, precision,
compile), `vitexp.train`'s own step in img/s (`lightning_step`), and the analytic training
FLOPs and the device's peak, for the model FLOPs utilisation (MFU)."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from vitexp.models import SIZES
from vitexp.training.step_timer import step_times

# Dense bf16 peak FLOP/s per device, for model FLOPs utilisation (vendor data sheets).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}

BENCH_SIZES = {"debug": "vit_tiny_debug", "S/16": "vit_s16", "B/16": "vit_b16"}  # -> SIZES


def size_of(case: Case) -> dict[str, int]:
    """Width, depth, heads and patch of the case's size (vitexp.models.factory.SIZES)."""
    fields = SIZES[BENCH_SIZES[case.size]][1]
    return {k: fields[k] for k in ("embed_dim", "depth", "num_heads", "patch_size")}


@dataclass(frozen=True)
class Case:
    """One architecture to time: size, resolution, batch and the Table-8 variant."""

    size: str
    img_size: int
    batch: int
    kind: str = "learned_1d"
    placement: str = "stem"
    pool: str = "cls"
    stem: str = "patch"
    num_classes: int = 1000

    @property
    def name(self) -> str:
        variant = {"learned_1d": "1-D", "learned_2d": "2-D"}.get(self.kind, self.kind)
        parts = [f"{self.size}@{self.img_size}", variant, self.placement.replace("_", "-")]
        parts += [self.pool] + (["hybrid R50"] if self.stem == "r50" else [])
        return " ".join(parts)

    @property
    def timm_has_it(self) -> bool:
        """timm's ViT computes exactly this variant (else its 1-D model is the reference)."""
        return self.kind in ("learned_1d", "none") and self.placement == "stem"


@dataclass
class Setup:
    """How a suite runs: device, precision, compile."""

    device: str = "cpu"
    dtype: str = "float32"  # autocast dtype; float32 means no autocast
    compile: bool = False
    steps: int = 3  # timed steps per repeat, at least
    min_seconds: float = 1.0  # and at least this long
    warmup: int = 2
    repeats: int = 5


# --- the real training step ------------------------------------------------------------------
def lightning_step(case: Case, setup: Setup, steps: int) -> dict[str, float]:
    """Images/s of `vitexp.train`'s own training step for the case: the run's config composed
    by Hydra, its Trainer (callbacks, logger, precision, compile) and its LightningModule,
    on in-memory batches so that only the step is timed."""
    from hydra import compose, initialize_config_dir

    from vitexp.config import CONFIG_DIR, register_configs, validate

    trainer_group = "gpu" if setup.device == "cuda" else "cpu"
    overrides = [
        f"trainer={trainer_group}",
        f"trainer.max_steps={setup.warmup + steps}",
        "trainer.limit_val_batches=0",
        "trainer.progress_bar=false",
        "logger=csv",
        "figures=false",
        "fewshot.enabled=false",
        f"trainer.compile={str(setup.compile).lower()}",
        f"model={BENCH_SIZES[case.size]}",
        f"model.img_size={case.img_size}",
        f"model.pool={case.pool}",
        f"model.pos_embed.kind={case.kind}",
        f"model.pos_embed.placement={case.placement}",
        f"data.batch_size={case.batch}",
        f"data.num_classes={case.num_classes}",
    ]
    register_configs()  # the model= choices (vitexp.train does it on import)
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        c = validate(compose("train", overrides=overrides))
    times = step_times(c, case.num_classes, setup.warmup, steps)
    return {"images_per_s": case.batch * len(times) / sum(times), "steps": steps}


# --- FLOPs -----------------------------------------------------------------------------------
def train_flops_per_image(case: Case) -> float:
    """Analytic training FLOPs of one image for the standard ViT (3 x forward: the backward
    costs twice the forward), counting multiply-adds as 2 FLOPs; the convention of MFU."""
    s = size_of(case)
    d, depth, p = s["embed_dim"], s["depth"], s["patch_size"]
    n = (case.img_size // p) ** 2
    t = n + (1 if case.pool == "cls" else 0)
    per_layer = 12 * t * d * d + 2 * t * t * d  # qkv+proj+MLP, then QK^T and AV
    macs = n * 3 * p * p * d + depth * per_layer + d * case.num_classes
    return 3 * 2 * macs


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return name, peak
