"""Structured configs (the schema of `configs/`) and the checks run before anything is built.

The schema composes the parts' own configs (each part owns its dataclass and its checks;
no part imports this module) with the run's settings defined here. Each dataclass is one
Hydra group and maps to one place in the code:

    data/      DataConfig      -> vitexp.data.ImageDataModule (owned by vitexp.data.config,
                                  with `validate_data`; data/augment: AugmentConfig)
    model/     ViTConfig       -> vitexp.models.VisionTransformer (model/pos_embed: PosEmbedSpec);
                                  the choices are vitexp.models.factory.SIZES
    optim/     OptimConfig     -> vitexp.training.module.ViTModule.configure_optimizers
    schedule/  ScheduleConfig  -> vitexp.training.module.lr_lambda
    trainer/   TrainerConfig   -> lightning.Trainer (vitexp.training.trainer.build_trainer)
    logger/    LoggerConfig    -> vitexp.training.trainer.build_logger

OmegaConf checks types and unknown keys while Hydra composes; `validate` checks values
and combinations and raises `ConfigError` with one line naming the key, the value and
what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from vitexp.data.config import DataConfig, validate_data
from vitexp.errors import ConfigError, check_fraction, check_one_of, check_positive

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")

STAGES = ("pretrain", "finetune")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("warmup_linear", "warmup_cosine", "constant")
LOSSES = ("softmax", "sigmoid")
LOGGERS = ("csv", "tensorboard", "wandb")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
PRETRAINED_WEIGHTS = ("averaged", "raw")
FSDP_STATE_DICTS = ("full", "sharded")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adam | adamw (decoupled decay, = the paper's "Adam + weight decay") | sgd
    lr: float = 1e-3
    weight_decay: float = 0.1  # not applied to norms, biases, position embeddings, class token
    beta1: float = 0.9
    beta2: float = 0.999
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    fused: bool = True  # PyTorch's fused optimizer kernel (CPU and CUDA); false: per-tensor loop
    # layer-wise lr decay (BEiT, MAE, DeiT III fine-tuning): the head trains at lr, block i of
    # L at lr * d ** (L - i), the stem (patch embedding, class token, position tables) at
    # lr * d ** (L + 1); null: off, one lr for every layer. In (0, 1].
    layer_decay: float | None = None


@dataclass
class ScheduleConfig:
    name: str = "warmup_cosine"  # warmup_linear | warmup_cosine | constant
    warmup_steps: int = 100
    end_lr_ratio: float = 0.0  # final lr as a fraction of optim.lr


@dataclass
class LossConfig:
    name: str = "softmax"  # softmax | sigmoid (the paper's pretraining loss)
    label_smoothing: float = 0.0


@dataclass
class EMAConfig:
    """Polyak / exponential moving average of the weights (vitexp.training.averaging), which
    validation, test, few-shot, figures and fine-tuning then use. The paper averaged with
    decay 0.9999 for its best ImageNet fine-tunes (Appendix B.1.1)."""

    decay: float | None = None  # null: no average
    # decay at update t: min(decay, (1 + t) / (10 + t)), as timm's ModelEmaV3 and TF's
    # ExponentialMovingAverage(num_updates): early averages follow the trained weights
    # rather than the first steps' (needed when the run is short next to 1 / (1 - decay))
    warmup: bool = False


@dataclass
class TrainerConfig:
    """lightning.Trainer's arguments, passed to it by name (`lightning_args`), then
    vitexp's own switches (`VITEXP_SWITCHES`), which are not Trainer arguments."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"  # auto: bf16-mixed on a CUDA GPU, else 32-true
    max_steps: int = -1
    max_epochs: int | None = None
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = 1.0  # global norm, as in the paper
    deterministic: bool = False
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    # --- vitexp's switches
    compile: bool | None = False  # torch.compile the model; null: on a CUDA GPU only
    checkpoint_every_n_steps: int | None = None  # also save last.ckpt every n steps
    progress_bar: bool = True  # rich progress bar
    ddp_timeout_s: int = 1800  # DDP/FSDP collectives; also the deadline after SIGTERM
    # strategy=fsdp: `full` writes last.ckpt as one file (rank 0 gathers the weights), `sharded`
    # as a directory of per-rank shards (no gather: for models too large for one host's RAM)
    fsdp_state_dict: str = "full"

    VITEXP_SWITCHES = (
        "compile",
        "checkpoint_every_n_steps",
        "progress_bar",
        "ddp_timeout_s",
        "fsdp_state_dict",
    )

    def lightning_args(self) -> dict[str, Any]:
        """The fields that are lightning.Trainer arguments, as given."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in self.VITEXP_SWITCHES
        }


@dataclass
class LoggerConfig:
    name: str = "csv"  # csv | tensorboard | wandb
    project: str = "vitexp"  # wandb
    offline: bool = True  # wandb: never needs a login unless set to false
    entity: str | None = None


@dataclass
class FewshotConfig:
    """Few-shot linear evaluation on dataset B (the metric of the paper's Table 8), run at
    every validation of a pretraining and on the final model."""

    enabled: bool = True  # during stage=pretrain
    data: DataConfig = field(default_factory=DataConfig)  # dataset B (configs: data@fewshot.data)
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])  # images per class
    draws: int = 5  # random k-shot sets averaged per k
    l2_reg: float = 1.0  # ridge penalty on standardised features
    max_test: int = 2000  # held-out images scored (a fixed seeded subset when larger)
    report_shot: int = 10  # the k that results.json and the ablation table report
    seed: int = 0


@dataclass
class TrainConfig:
    stage: str = "pretrain"  # pretrain (on dataset A) | finetune (on dataset B)
    name: str = "run"  # groups runs under outputs/<name>/
    seed: int = 0
    pretrained: str | None = None  # finetune: vitexp checkpoint or timm-format weight file
    pretrained_weights: str = "averaged"  # averaged (the EMA, where the run kept one) | raw
    ckpt_path: str | None = None  # resume: a .ckpt path, or `last`
    output_root: str = "outputs"
    figures: bool = True  # pretraining: the paper's four figures at the end (analysis.figures)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING  # a model family's config (ViTConfig); typed by the model= choice
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)


MODEL_SCHEMA = "model_schema"  # group of the family schemas, one per model family


def register_configs() -> None:
    """The schema of configs/train.yaml's defaults list, and one `model=` choice per entry
    of the sizes table: the family's schema (types, allowed keys), then the default
    position embedding (the `model/pos_embed` group), then the size's own fields."""
    from vitexp.models.factory import FAMILIES, SIZES

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for family, spec in FAMILIES.items():
        store.store(group=MODEL_SCHEMA, name=family, node=spec.config)
    for name, (family, size) in SIZES.items():
        defaults = [f"/{MODEL_SCHEMA}/{family}@_here_"]
        if "pos_embed" in {f.name for f in fields(FAMILIES[family].config)}:
            defaults.append({"pos_embed": "learned_1d"})
        node = {"defaults": [*defaults, "_self_"], "name": name, **size}
        store.store(group="model", name=name, node=node)


# --- validation --------------------------------------------------------------------------
def without_hydra(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as plain data, resolved, without Hydra's own node."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return plain


def to_object(cfg: DictConfig) -> TrainConfig:
    """The composed config as typed dataclasses (the schema guarantees the types)."""
    from vitexp.models import NotApplicableCell

    plain = without_hydra(cfg)
    missing = sorted(OmegaConf.missing_keys(plain))
    if missing:
        raise ConfigError(
            f"{missing[0]} is not set (???); give it on the command line, e.g. {missing[0]}=..."
        )
    typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
    typed.model = OmegaConf.merge(OmegaConf.structured(_model_schema(cfg)), plain["model"])
    try:
        return OmegaConf.to_object(typed)
    except NotApplicableCell as err:
        err.args = (f"model.{err}",)  # the model names its own fields; here they are model.*
        raise
    except ValueError as err:  # a model config checks its own fields (ValueError names one)
        raise ConfigError(f"model.{err}") from None


def _model_schema(cfg: DictConfig) -> type:
    """The family dataclass of the composed `model` node (the `model=` choice typed it);
    a plain mapping (a config.yaml read back) is a ViT's."""
    from vitexp.models.factory import FAMILIES

    schema = OmegaConf.get_type(cfg.model) if OmegaConf.is_config(cfg.model) else None
    families = {f.config for f in FAMILIES.values()}
    return schema if schema in families else FAMILIES["vit"].config


def validate(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """Check every value and combination; return the typed config or raise ConfigError."""
    c = cfg if isinstance(cfg, TrainConfig) else to_object(cfg)
    check_one_of("stage", c.stage, STAGES)
    if c.stage == "finetune" and not c.pretrained:
        raise ConfigError(
            "stage=finetune needs pretrained=PATH (a vitexp .ckpt or a timm .safetensors/.pth)"
        )
    validate_data(c.data)
    _validate_model(c.model)
    _validate_optim(c)
    check_one_of("loss.name", c.loss.name, LOSSES)
    check_fraction("loss.label_smoothing", c.loss.label_smoothing)
    check_one_of("pretrained_weights", c.pretrained_weights, PRETRAINED_WEIGHTS)
    if c.ema.decay is not None:
        if not 0 < c.ema.decay < 1:
            raise ConfigError(
                f"ema.decay={c.ema.decay!r} must be in (0, 1), e.g. 0.9999 (null: no average)"
            )
        if c.trainer.strategy == "fsdp":
            raise ConfigError(
                "ema.decay is set with trainer.strategy=fsdp: the average is a full copy of "
                "the model on each rank, which FSDP's shards do not have; use trainer=ddp or "
                "ema.decay=null"
            )
    _validate_trainer(c.trainer)
    if c.trainer.strategy == "fsdp" and c.trainer.compile:
        raise ConfigError(
            "trainer.compile=true with trainer.strategy=fsdp: the compiled forward would trace "
            "through FSDP's units; set trainer.compile=false (trainer=fsdp does)"
        )
    if c.trainer.strategy == "fsdp" and c.stage == "pretrain" and (c.fewshot.enabled or c.figures):
        raise ConfigError(
            "trainer=fsdp shards the weights across ranks; set fewshot.enabled=false "
            "figures=false and run vitexp.fewshot / vitexp.visualize on the checkpoint instead"
        )
    check_one_of("logger.name", c.logger.name, LOGGERS)
    if c.stage == "pretrain" and c.fewshot.enabled:
        validate_fewshot(c.fewshot)
    return c


def validate_fewshot(f: FewshotConfig, key: str = "fewshot.data", report: bool = True) -> None:
    """Check few-shot settings; `report`: also the k reported in results (training only)."""
    validate_data(f.data, key)
    if not f.shots or any(k < 1 for k in f.shots):
        raise ConfigError(f"fewshot.shots={list(f.shots)} must be a non-empty list of ints >= 1")
    if report and f.report_shot not in f.shots:
        raise ConfigError(
            f"fewshot.report_shot={f.report_shot} is not in fewshot.shots={list(f.shots)}"
        )
    check_positive("fewshot.draws", f.draws)
    check_positive("fewshot.l2_reg", f.l2_reg)
    check_positive("fewshot.max_test", f.max_test)


def _validate_model(m: Any) -> None:
    """Build the model on the meta device: the checks that need its layers (patches tiling
    the image, widths a position embedding needs) run, nothing is allocated (a ViT-H
    builds in milliseconds). The config checked its own fields when it was made."""
    import torch

    from vitexp.models import build_model

    try:
        with torch.device("meta"):
            build_model(m, num_classes=2)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def _validate_optim(c: TrainConfig) -> None:
    o = c.optim
    check_one_of("optim.name", o.name, OPTIMIZERS)
    check_positive("optim.lr", o.lr)
    check_positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    check_fraction("optim.beta1", o.beta1)
    check_fraction("optim.beta2", o.beta2)
    check_fraction("optim.momentum", o.momentum)
    if o.layer_decay is not None and not 0 < o.layer_decay <= 1:
        raise ConfigError(
            f"optim.layer_decay={o.layer_decay!r} must be in (0, 1] (null: no layer-wise decay)"
        )
    s = c.schedule
    check_one_of("schedule.name", s.name, SCHEDULES)
    check_positive("schedule.warmup_steps", s.warmup_steps, allow_zero=True)
    check_fraction("schedule.end_lr_ratio", s.end_lr_ratio, 0.0, 1.0 + 1e-9)


def _validate_trainer(t: TrainerConfig) -> None:
    check_one_of("trainer.precision", str(t.precision), PRECISIONS)
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"trainer.max_steps={t.max_steps} must be > 0 (or -1: use max_epochs)")
    if t.max_steps == -1 and not t.max_epochs:
        raise ConfigError("set trainer.max_steps or trainer.max_epochs (both are unset)")
    check_positive("trainer.max_epochs", t.max_epochs)
    check_positive("trainer.num_nodes", t.num_nodes)
    check_positive("trainer.log_every_n_steps", t.log_every_n_steps)
    check_positive("trainer.gradient_clip_val", t.gradient_clip_val, allow_zero=True)
    check_positive("trainer.checkpoint_every_n_steps", t.checkpoint_every_n_steps)
    check_one_of("trainer.fsdp_state_dict", t.fsdp_state_dict, FSDP_STATE_DICTS)
    check_positive("trainer.check_val_every_n_epoch", t.check_val_every_n_epoch)
    if isinstance(t.val_check_interval, (int, float)):
        check_positive("trainer.val_check_interval", t.val_check_interval)
    check_positive("trainer.ddp_timeout_s", t.ddp_timeout_s)
    devices = t.devices
    if type(devices) is int and (devices == 0 or devices < -1):
        raise ConfigError(f"trainer.devices={t.devices} must be >= 1, -1 (all) or a list")
