"""Structured configs (the schema of `configs/`) and the checks run before anything is built.

Each dataclass is one Hydra group and maps to one place in the code:

    data/      DataConfig      -> vitexp.data.ImageDataModule
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

from vitexp.errors import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")

STAGES = ("pretrain", "finetune")
SOURCES = ("digits", "fashion_mnist", "shapes", "torchvision", "imagefolder", "hf", "litdata")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("warmup_linear", "warmup_cosine", "constant")
LOSSES = ("softmax", "sigmoid")
LOGGERS = ("csv", "tensorboard", "wandb")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
ON_CORRUPT = ("skip", "error")
DECODES = ("cpu", "gpu")
PRETRAINED_WEIGHTS = ("averaged", "raw")
FSDP_STATE_DICTS = ("full", "sharded")


@dataclass
class RandAugmentConfig:
    """torchvision's RandAugment on each training image (AugReg's `randaug(N, M)`).

    num_ops: ops per image (0: off). magnitude: on torchvision's scale, 0 ..
    num_magnitude_bins - 1, the last bin each op's full range (the RandAugment paper's
    magnitude 10); AugReg's M (TF scale, 10 = full range) is M x 3 here, capped at 30.
    """

    num_ops: int = 0
    magnitude: int = 9
    num_magnitude_bins: int = 31


@dataclass
class AugmentConfig:
    """Training augmentation and eval resizing. Per image: the paper's Inception crop +
    flip, then RandAugment; per batch (on the device): MixUp or CutMix with soft targets
    (vitexp.data.transforms.BatchMix). The evaluation path only resizes and crops."""

    random_resized_crop: bool = True
    scale_min: float = 0.08  # lower bound of the crop's area fraction
    hflip: bool = True
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, center-crop img_size
    randaugment: RandAugmentConfig = field(default_factory=RandAugmentConfig)
    mixup_alpha: float = 0.0  # MixUp's Beta(alpha, alpha); 0: off
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha); 0: off
    mix_prob: float = 1.0  # probability that a batch is mixed at all (with either on)
    switch_prob: float = 0.5  # with both on: probability of CutMix instead of MixUp


@dataclass
class ShapesConfig:
    """Procedural dataset sizes (see vitexp.data.shapes)."""

    num_train: int = 20_000
    num_val: int = 1_000
    num_test: int = 2_000
    cache_dir: str | None = None  # render each split once into a .npy file here (reused)


@dataclass
class DataConfig:
    name: str = "digits"  # label used in results, reports and log keys
    source: str = (
        "digits"  # digits | fashion_mnist | shapes | torchvision | imagefolder | hf | litdata
    )
    dataset: str | None = None  # torchvision: CIFAR10 | CIFAR100; hf: hub name or builder
    root: str | None = None  # where the data lives on disk
    # hf: local files per split, e.g. {train: a.parquet}
    data_files: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None  # null: from the data; else checked against it
    # keep only these classes (names or indices of the source's), relabelled 0.. in this
    # order: e.g. pretrain on 6 Fashion-MNIST classes, transfer to the other 4
    classes: list[Any] | None = None
    batch_size: int = 64  # per device
    global_batch_size: int | None = None  # kept across device counts by accumulation
    num_workers: int = 2
    download: bool = False  # never fetch data unless asked
    seed: int = 0  # seed of the held-out splits
    val_fraction: float = 0.1  # of train, when the source has no validation split
    test_fraction: float = 0.2  # of all data, when the source has no test split
    image_column: str = "image"  # hf
    label_column: str = "label"  # hf
    streaming: bool = False  # hf: stream shards instead of downloading/reading them whole
    train_split: str = "train"  # hf split names
    val_split: str | None = None
    test_split: str | None = "test"
    val_size: int = 1000  # hf streaming: examples taken from the head of train for validation
    shuffle_buffer: int = 10_000  # hf streaming: rows each loader worker shuffles among
    on_corrupt: str = "error"  # skip | error: what an unreadable image does
    # cpu: loader workers decode and augment; gpu: workers send JPEG bytes and the device
    # decodes (nvjpeg), crops, flips, augments and normalises (vitexp.data.gpu_decode)
    decode: str = "cpu"
    # a fixed subset of the training split (after the val/test holdout): null = all of it,
    # an int = that many images, a float in (0, 1] = that fraction; class-balanced and nested
    # (a smaller subset is part of a larger one with the same subset_seed); a stream: its
    # first N rows (vitexp.data.datamodule)
    subset: Any = None
    subset_seed: int = 0  # which images the subset holds; independent of the training seed
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


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
    figures: bool = True  # pretraining: the paper's four figures at the end (vitexp.visualize)
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
def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} must be {bound}")


def _fraction(key: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    if not low <= value < high:
        raise ConfigError(f"{key}={value!r} must be in [{low}, {high})")


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
    _one_of("stage", c.stage, STAGES)
    if c.stage == "finetune" and not c.pretrained:
        raise ConfigError(
            "stage=finetune needs pretrained=PATH (a vitexp .ckpt or a timm .safetensors/.pth)"
        )
    _validate_data(c.data)
    _validate_model(c.model)
    _validate_optim(c)
    _one_of("loss.name", c.loss.name, LOSSES)
    _fraction("loss.label_smoothing", c.loss.label_smoothing)
    _one_of("pretrained_weights", c.pretrained_weights, PRETRAINED_WEIGHTS)
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
    _one_of("logger.name", c.logger.name, LOGGERS)
    if c.stage == "pretrain" and c.fewshot.enabled:
        validate_fewshot(c.fewshot)
    return c


def validate_fewshot(f: FewshotConfig, key: str = "fewshot.data", report: bool = True) -> None:
    """Check few-shot settings; `report`: also the k reported in results (training only)."""
    _validate_data(f.data, key)
    if not f.shots or any(k < 1 for k in f.shots):
        raise ConfigError(f"fewshot.shots={list(f.shots)} must be a non-empty list of ints >= 1")
    if report and f.report_shot not in f.shots:
        raise ConfigError(
            f"fewshot.report_shot={f.report_shot} is not in fewshot.shots={list(f.shots)}"
        )
    _positive("fewshot.draws", f.draws)
    _positive("fewshot.l2_reg", f.l2_reg)
    _positive("fewshot.max_test", f.max_test)


def _validate_data(d: DataConfig, key: str = "data") -> None:
    _one_of(f"{key}.source", d.source, SOURCES)
    _one_of(f"{key}.on_corrupt", d.on_corrupt, ON_CORRUPT)
    _one_of(f"{key}.decode", d.decode, DECODES)
    if d.num_classes is not None and d.num_classes < 2:
        raise ConfigError(f"{key}.num_classes={d.num_classes} must be >= 2")
    _positive(f"{key}.batch_size", d.batch_size)
    _positive(f"{key}.global_batch_size", d.global_batch_size)
    _positive(f"{key}.num_workers", d.num_workers, allow_zero=True)
    _fraction(f"{key}.val_fraction", d.val_fraction)
    _fraction(f"{key}.test_fraction", d.test_fraction)
    _positive(f"{key}.val_size", d.val_size)
    _positive(f"{key}.shuffle_buffer", d.shuffle_buffer)
    for split in ("num_train", "num_val", "num_test"):
        _positive(f"{key}.shapes.{split}", getattr(d.shapes, split))
    if d.global_batch_size and d.global_batch_size % d.batch_size:
        raise ConfigError(
            f"{key}.global_batch_size={d.global_batch_size} is not a multiple of "
            f"{key}.batch_size={d.batch_size}"
        )
    if d.source in ("torchvision", "hf") and not d.dataset:
        raise ConfigError(
            f"{key}.dataset is not set; {key}.source={d.source} needs it "
            "(torchvision: CIFAR10 or CIFAR100; hf: a hub name or a builder such as parquet)"
        )
    if d.source == "litdata" and d.subset is not None:
        raise ConfigError(
            f"{key}.subset={d.subset!r} is not supported with {key}.source=litdata; pack the "
            "subset you want (python -m vitexp.pack) or use data=imagefolder / data=hf"
        )
    if d.source in ("torchvision", "imagefolder", "litdata") and not d.root:
        raise ConfigError(
            f"{key}.root is not set; {key}.source={d.source} reads the images from there "
            f"({key}.root=/path/to/data)"
        )
    check_subset(d, key, ConfigError)
    if d.classes is not None:
        kept = list(d.classes)
        if len(kept) < 2 or len(set(map(str, kept))) != len(kept):
            raise ConfigError(
                f"{key}.classes={kept} must name at least 2 different classes (names or indices)"
            )
        if d.source == "litdata" or d.streaming:
            raise ConfigError(
                f"{key}.classes is not supported for a stream or a pack; pack or stream only "
                "the classes you want"
            )
    a = d.augment
    if not 0 < a.scale_min <= 1:
        raise ConfigError(f"{key}.augment.scale_min={a.scale_min} must be in (0, 1]")
    if not 0 < a.crop_pct <= 1:
        raise ConfigError(f"{key}.augment.crop_pct={a.crop_pct} must be in (0, 1]")
    _validate_augment(a, f"{key}.augment")


def _validate_augment(a: AugmentConfig, key: str) -> None:
    r = a.randaugment
    _positive(f"{key}.randaugment.num_ops", r.num_ops, allow_zero=True)
    _positive(f"{key}.randaugment.num_magnitude_bins", r.num_magnitude_bins)
    if not 0 <= r.magnitude < r.num_magnitude_bins:
        raise ConfigError(
            f"{key}.randaugment.magnitude={r.magnitude} must be in [0, "
            f"{r.num_magnitude_bins - 1}] ({key}.randaugment.num_magnitude_bins - 1 is each "
            "op's full range)"
        )
    _positive(f"{key}.mixup_alpha", a.mixup_alpha, allow_zero=True)
    _positive(f"{key}.cutmix_alpha", a.cutmix_alpha, allow_zero=True)
    for name in ("mix_prob", "switch_prob"):
        if not 0 <= getattr(a, name) <= 1:
            raise ConfigError(f"{key}.{name}={getattr(a, name)!r} must be in [0, 1]")


def check_subset(d: DataConfig, key: str = "data", error: type = ConfigError) -> None:
    """data.subset: null, an int >= 1 (images) or a float in (0, 1] (a fraction of the
    training split; not for a stream, whose length is unknown); data.subset_seed an int >= 0.
    Raises `error` with one line naming the key."""
    value, seed = d.subset, d.subset_seed
    if type(seed) is not int or seed < 0:
        raise error(f"{key}.subset_seed={seed!r} must be an int >= 0")
    if value is None:
        return
    if type(value) is int and value >= 1:
        return
    if type(value) is float and 0 < value <= 1:
        if d.source == "hf" and d.streaming:
            raise error(
                f"{key}.subset={value!r} is a fraction, but {key}.streaming=true reads a stream "
                f"of unknown length; give a number of images, e.g. {key}.subset=10000"
            )
        return
    raise error(
        f"{key}.subset={value!r} must be null (all training images), an int >= 1 (a number "
        "of images) or a float in (0, 1] (a fraction of the training split)"
    )


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
    _one_of("optim.name", o.name, OPTIMIZERS)
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _fraction("optim.beta1", o.beta1)
    _fraction("optim.beta2", o.beta2)
    _fraction("optim.momentum", o.momentum)
    if o.layer_decay is not None and not 0 < o.layer_decay <= 1:
        raise ConfigError(
            f"optim.layer_decay={o.layer_decay!r} must be in (0, 1] (null: no layer-wise decay)"
        )
    s = c.schedule
    _one_of("schedule.name", s.name, SCHEDULES)
    _positive("schedule.warmup_steps", s.warmup_steps, allow_zero=True)
    _fraction("schedule.end_lr_ratio", s.end_lr_ratio, 0.0, 1.0 + 1e-9)


def _validate_trainer(t: TrainerConfig) -> None:
    _one_of("trainer.precision", str(t.precision), PRECISIONS)
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"trainer.max_steps={t.max_steps} must be > 0 (or -1: use max_epochs)")
    if t.max_steps == -1 and not t.max_epochs:
        raise ConfigError("set trainer.max_steps or trainer.max_epochs (both are unset)")
    _positive("trainer.max_epochs", t.max_epochs)
    _positive("trainer.num_nodes", t.num_nodes)
    _positive("trainer.log_every_n_steps", t.log_every_n_steps)
    _positive("trainer.gradient_clip_val", t.gradient_clip_val, allow_zero=True)
    _positive("trainer.checkpoint_every_n_steps", t.checkpoint_every_n_steps)
    _one_of("trainer.fsdp_state_dict", t.fsdp_state_dict, FSDP_STATE_DICTS)
    _positive("trainer.check_val_every_n_epoch", t.check_val_every_n_epoch)
    if isinstance(t.val_check_interval, (int, float)):
        _positive("trainer.val_check_interval", t.val_check_interval)
    _positive("trainer.ddp_timeout_s", t.ddp_timeout_s)
    devices = t.devices
    if type(devices) is int and (devices == 0 or devices < -1):
        raise ConfigError(f"trainer.devices={t.devices} must be >= 1, -1 (all) or a list")
