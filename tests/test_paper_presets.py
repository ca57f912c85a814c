"""The paper's recipes (Dosovitskiy et al., ICLR 2021): every pretraining and fine-tuning
preset against a transcription of the paper's Table 3, Table 4, section 4.1 and Appendix
B.1.1, with the values the paper does not give checked against what the presets say they
take instead; and the sigmoid loss's head-bias init (`model.head_bias_init`)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from test_config import compose_cfg
from vitexp.config import CONFIG_DIR, LossConfig, OptimConfig, ScheduleConfig, validate
from vitexp.errors import ConfigError
from vitexp.models import create_model
from vitexp.models.factory import model_record
from vitexp.training.checkpoint import check_architecture, check_resumable, load_pretrained
from vitexp.training.module import ViTModule

EXPERIMENTS = Path(CONFIG_DIR) / "experiment"

# --- the paper, transcribed ---------------------------------------------------------------
# Table 3: "Hyperparameters for training." Models, Dataset, Epochs, Base LR, LR decay,
# Weight decay, Dropout (epochs "7/14": either).
TABLE_3 = [
    ("ViT-B/{16,32}", "JFT-300M", (7,), 8e-4, "linear", 0.1, 0.0),
    ("ViT-L/32", "JFT-300M", (7,), 6e-4, "linear", 0.1, 0.0),
    ("ViT-L/16", "JFT-300M", (7, 14), 4e-4, "linear", 0.1, 0.0),
    ("ViT-H/14", "JFT-300M", (14,), 3e-4, "linear", 0.1, 0.0),
    ("R50x{1,2}", "JFT-300M", (7,), 1e-3, "linear", 0.1, 0.0),
    ("R101x1", "JFT-300M", (7,), 8e-4, "linear", 0.1, 0.0),
    ("R152x{1,2}", "JFT-300M", (7,), 6e-4, "linear", 0.1, 0.0),
    ("R50+ViT-B/{16,32}", "JFT-300M", (7,), 8e-4, "linear", 0.1, 0.0),
    ("R50+ViT-L/32", "JFT-300M", (7,), 2e-4, "linear", 0.1, 0.0),
    ("R50+ViT-L/16", "JFT-300M", (7, 14), 4e-4, "linear", 0.1, 0.0),
    ("ViT-B/{16,32}", "ImageNet-21k", (90,), 1e-3, "linear", 0.03, 0.1),
    ("ViT-L/{16,32}", "ImageNet-21k", (30, 90), 1e-3, "linear", 0.03, 0.1),
    ("ViT-*", "ImageNet", (300,), 3e-3, "cosine", 0.3, 0.1),
]
# Table 3's caption: "All models are trained with a batch size of 4096 and learning rate
# warmup of 10k steps. For ImageNet we found it beneficial to additionally apply gradient
# clipping at global norm 1. Training resolution is 224."
TABLE_3_CAPTION = {"batch": 4096, "warmup_steps": 10_000, "clip_imagenet": 1.0, "img_size": 224}
# Section 4.1: "We train all models, including ResNets, using Adam with beta1 = 0.9,
# beta2 = 0.999, a batch size of 4096 and apply a high weight decay of 0.1 ... For fine-tuning
# we use SGD with momentum, batch size 512, for all models ... For ImageNet results in Table 2,
# we fine-tuned at higher resolution: 512 for ViT-L/16 and 518 for ViT-H/14, and also used
# Polyak & Juditsky (1992) averaging with a factor of 0.9999".
SECTION_4_1 = {
    "beta1": 0.9,
    "beta2": 0.999,
    "batch": 4096,
    "weight_decay": 0.1,
    "table_2_img_size": {"ViT-L/16": 512, "ViT-H/14": 518},
    "table_2_polyak": 0.9999,
}
# Table 4: "Hyperparameters for fine-tuning." Dataset, Steps, Base LR.
TABLE_4 = {
    "ImageNet": (20_000, (0.003, 0.01, 0.03, 0.06)),
    "CIFAR100": (10_000, (0.001, 0.003, 0.01, 0.03)),
    "CIFAR10": (10_000, (0.001, 0.003, 0.01, 0.03)),
    "Oxford-IIIT Pets": (500, (0.001, 0.003, 0.01, 0.03)),
    "Oxford Flowers-102": (500, (0.001, 0.003, 0.01, 0.03)),
    "VTAB (19 tasks)": (2_500, (0.01,)),
}
# Table 4's caption: "All models are fine-tuned with cosine learning rate decay, a batch size
# of 512, no weight decay, and grad clipping at global norm 1. If not mentioned otherwise,
# fine-tuning resolution is 384."
TABLE_4_CAPTION = {"decay": "cosine", "batch": 512, "weight_decay": 0.0, "clip": 1.0}
TABLE_4_CAPTION["img_size"] = 384
# Appendix B.1.1: "We fine-tune all ViT models using SGD with a momentum of 0.9", small
# development sub-splits of the training set "(10% for Pets and Flowers, 2% for CIFAR, 1%
# ImageNet)"; ResNets and hybrids: "the exact same setup, with the only exception of ImageNet
# where we add another value 0.06 to the learning rate sweep"; the whole head (two linear
# layers) is replaced by "a single, zero-initialized linear layer".
APPENDIX_B_1_1 = {
    "optimizer": "sgd",
    "momentum": 0.9,
    "dev_split": {"ImageNet": 0.01, "CIFAR10": 0.02, "CIFAR100": 0.02},
    "resnet_imagenet_extra_lr": 0.06,
}

SCHEDULES = {"linear": "warmup_linear", "cosine": "warmup_cosine"}
# Images per epoch of the streamed pretraining sets, to turn Table 3's epochs into steps
# (not in the paper, which says "14M" and "303M"): ImageNet-21k fall 2011, JFT-300M.
IMAGES = {"ImageNet-21k": 14_197_122, "JFT-300M": 303_000_000}

# --- what each preset follows ---------------------------------------------------------------
# model, Table 3 row (ViT rows; a BiT preset borrows the row of the ViT it is compared to:
# Table 3 has no ResNet row for ImageNet or ImageNet-21k), loss and head-bias init (not in
# the paper: big_vision's i21k configs, sigmoid with init_head_bias -10).
PRETRAIN = {
    "pretrain_in1k": ("vit_b16", ("ViT-*", "ImageNet"), "softmax", 0.0),
    "pretrain_in21k": ("vit_b16", ("ViT-B/{16,32}", "ImageNet-21k"), "sigmoid", -10.0),
    "pretrain_jft": ("vit_b16", ("ViT-B/{16,32}", "JFT-300M"), "sigmoid", -10.0),
    "pretrain_in1k_bit": ("bit_r50x1", ("ViT-*", "ImageNet"), "softmax", 0.0),
    "pretrain_in21k_bit": ("bit_r50x1", ("ViT-B/{16,32}", "ImageNet-21k"), "sigmoid", -10.0),
}
# model, Table 4 dataset, image size (section 4.1 for Table 2's ImageNet runs), Polyak decay
FINETUNE = {
    "finetune_in1k": ("vit_b16", "ImageNet", 384, None),
    "finetune_in1k_bit": ("bit_r50x1", "ImageNet", 384, None),
    "finetune_cifar10": ("vit_b16", "CIFAR10", 384, None),
    "finetune_cifar100": ("vit_b16", "CIFAR100", 384, None),
    # Table 2's ViT-H/14, with its Polyak averaging (section 4.1)
    "finetune_vith14_518": (
        "vit_h14",
        "ImageNet",
        SECTION_4_1["table_2_img_size"]["ViT-H/14"],
        SECTION_4_1["table_2_polyak"],
    ),
}
NOT_PAPER_PRESETS = ("quickstart_", "ablation_posemb", "data_scaling", "fashion_")


def table_3(model: str, dataset: str) -> tuple:
    return next(r for r in TABLE_3 if r[:2] == (model, dataset))


def preset(name: str, *overrides: str):
    given = ["pretrained=weights.safetensors"] if name == "finetune_vith14_518" else []
    return validate(compose_cfg([f"+experiment={name}", *given, *overrides]))


def test_every_paper_preset_is_in_the_table():
    names = {p.stem for p in EXPERIMENTS.glob("*.yaml")}
    paper = {n for n in names if not n.startswith(NOT_PAPER_PRESETS) and "augreg" not in n}
    assert paper == set(PRETRAIN) | set(FINETUNE)


def test_the_transcription_is_consistent():
    """The caption and section 4.1 agree on the batch; every ViT preset's row exists."""
    assert TABLE_3_CAPTION["batch"] == SECTION_4_1["batch"] == 4096
    assert all(len(r) == 7 and r[4] in SCHEDULES for r in TABLE_3)
    assert all(r[5] == SECTION_4_1["weight_decay"] for r in TABLE_3 if r[1] == "JFT-300M")
    assert APPENDIX_B_1_1["resnet_imagenet_extra_lr"] in TABLE_4["ImageNet"][1]


@pytest.mark.parametrize("name", sorted(PRETRAIN))
def test_pretraining_preset_follows_table_3(name):
    model, (row_model, dataset), loss, head_bias = PRETRAIN[name]
    _, _, epochs, lr, decay, weight_decay, dropout = table_3(row_model, dataset)
    c = preset(name)
    bit = model.startswith("bit_")
    assert c.stage == "pretrain" and c.model.name == model
    # section 4.1 (every model) and Table 3's caption
    assert (c.optim.name, c.optim.beta1, c.optim.beta2) == (
        "adamw",
        SECTION_4_1["beta1"],
        SECTION_4_1["beta2"],
    )
    assert c.data.global_batch_size == TABLE_3_CAPTION["batch"]
    assert c.schedule.warmup_steps == TABLE_3_CAPTION["warmup_steps"]
    assert c.model.img_size == (TABLE_3_CAPTION["img_size"],) * 2
    # the Table 3 row (for BiT: lr, decay and epochs borrowed from the ViT row; wd: 4.1's)
    assert c.optim.lr == lr
    assert c.schedule.name == SCHEDULES[decay]
    assert c.optim.weight_decay == (SECTION_4_1["weight_decay"] if bit else weight_decay)
    if bit:
        assert not hasattr(c.model, "drop_rate")  # BiT has no dropout (Table 3's ResNets: 0.0)
    else:
        assert c.model.drop_rate == dropout
        assert c.model.representation_size  # section 3.1: a pre-logits layer to pretrain
    if dataset == "ImageNet":
        assert c.trainer.max_epochs in epochs
    else:  # streamed: the epochs as steps of the global batch, rounded up (< 100 more)
        needed = math.ceil(IMAGES[dataset] * max(epochs) / TABLE_3_CAPTION["batch"])
        assert c.trainer.max_epochs is None
        assert needed <= c.trainer.max_steps < needed + 100, (needed, c.trainer.max_steps)
    # clipping: the caption's for ImageNet; the other sets keep it (not in the paper)
    assert c.trainer.gradient_clip_val == TABLE_3_CAPTION["clip_imagenet"]
    # not in the paper: the loss and the head's bias init (big_vision's i21k configs)
    assert (c.loss.name, c.model.head_bias_init) == (loss, head_bias)
    assert c.ema.decay is None


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_finetuning_preset_follows_table_4_and_appendix_b11(name):
    model, dataset, img_size, polyak = FINETUNE[name]
    steps, grid = TABLE_4[dataset]
    c = preset(name)
    assert c.stage == "finetune" and c.model.name == model and c.pretrained
    assert (c.optim.name, c.optim.momentum, c.optim.nesterov) == (
        APPENDIX_B_1_1["optimizer"],
        APPENDIX_B_1_1["momentum"],
        False,
    )
    assert c.optim.lr in grid
    assert c.optim.weight_decay == TABLE_4_CAPTION["weight_decay"]
    assert c.schedule.name == SCHEDULES[TABLE_4_CAPTION["decay"]]
    assert c.data.global_batch_size == TABLE_4_CAPTION["batch"]
    assert c.trainer.gradient_clip_val == TABLE_4_CAPTION["clip"]
    assert (c.trainer.max_steps, c.trainer.max_epochs) == (steps, None)
    assert c.model.img_size == (img_size, img_size)
    assert c.data.val_fraction == APPENDIX_B_1_1["dev_split"][dataset]
    if not model.startswith("bit_"):
        assert c.model.representation_size is None  # B.1.1: the whole head is replaced
        assert c.model.drop_rate == 0.0  # not in the paper (vit_jax's B/16: 0.0)
    assert c.ema.decay == polyak
    # not in the paper: vit_jax's 500 warmup steps, the softmax loss, the zero head
    assert (c.schedule.warmup_steps, c.loss.name, c.model.head_bias_init) == (500, "softmax", 0.0)


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_finetuning_comments_quote_their_datasets_grid(name):
    """The lr grid a preset's comment quotes is its own dataset's row of Table 4 (the
    ImageNet presets once quoted the CIFAR grid)."""
    text = (EXPERIMENTS / f"{name}.yaml").read_text()
    _, dataset, _, _ = FINETUNE[name]
    quoted = "{" + ", ".join(f"{lr:g}" for lr in TABLE_4[dataset][1]) + "}"
    assert quoted in text
    for other, (_, grid) in TABLE_4.items():
        wrong = "{" + ", ".join(f"{lr:g}" for lr in grid) + "}"
        if wrong != quoted:
            assert wrong not in text, f"{name} quotes {other}'s grid"


def test_table_2s_polyak_averaging_runs_the_vith14_preset_under_ddp():
    """Section 4.1: the Table 2 ImageNet fine-tunes average with 0.9999. The average is a
    full copy of the weights on each rank, so the preset runs under DDP; the sharded
    alternative its comment gives drops the average (validation refuses FSDP with one)."""
    c = preset("finetune_vith14_518")
    assert c.ema.decay == SECTION_4_1["table_2_polyak"] and c.trainer.strategy == "ddp"
    assert c.model.img_size == (518, 518) and c.optim.lr in TABLE_4["ImageNet"][1]
    assert c.data.global_batch_size == 512 and c.trainer.max_steps == 20_000
    text = (EXPERIMENTS / "finetune_vith14_518.yaml").read_text()
    assert "trainer=fsdp trainer.devices=8 ema.decay=null" in text
    sharded = preset("finetune_vith14_518", "trainer=fsdp", "trainer.devices=8", "ema.decay=null")
    assert sharded.trainer.strategy == "fsdp" and sharded.ema.decay is None
    with pytest.raises(ConfigError, match="ema.decay is set with trainer.strategy=fsdp"):
        preset("finetune_vith14_518", "trainer=fsdp")


# --- the sigmoid loss's head bias ----------------------------------------------------------
def first_sigmoid_loss(model: torch.nn.Module) -> float:
    module = ViTModule(model, OptimConfig(), ScheduleConfig(), LossConfig("sigmoid"))
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, model.num_classes, (8,))
    with torch.no_grad():
        return float(module.loss_fn(module(images), labels))


@pytest.mark.parametrize("size", ["vit_tiny_debug", "bit_tiny_debug"])
def test_head_bias_init_makes_the_first_sigmoid_loss_small(size):
    classes = 1000
    low = create_model(size, num_classes=classes, head_bias_init=-10.0)
    zero = create_model(size, num_classes=classes)
    assert torch.equal(low.head.bias, torch.full((classes,), -10.0))
    assert torch.equal(zero.head.bias, torch.zeros(classes))
    assert torch.equal(low.head.weight, torch.zeros_like(low.head.weight))
    big, small = first_sigmoid_loss(zero), first_sigmoid_loss(low)
    # zero logits: 1000 x ln 2 = 693; at -10: ~10 for the true class, ~0 for the rest
    assert big == pytest.approx(classes * math.log(2), rel=1e-4)
    assert small < 11 and big / small > 50


@pytest.mark.parametrize("size", ["vit_tiny_debug", "bit_tiny_debug"])
def test_head_bias_init_blocks_neither_fine_tuning_nor_resuming(size, tmp_path: Path):
    """An init, not architecture: a checkpoint pretrained at -10 fine-tunes into a zero head
    (the paper's) and resumes under a config that says otherwise."""
    source = create_model(size, num_classes=20, head_bias_init=-10.0)
    path = tmp_path / "pretrained.ckpt"
    state = {"net." + k: v for k, v in source.state_dict().items()}
    torch.save({"vitexp": model_record(source), "state_dict": state}, path)
    assert model_record(source)["model_config"]["head_bias_init"] == -10.0  # recorded
    for bias in (0.0, -10.0):
        target = create_model(size, num_classes=5, head_bias_init=bias)
        check_architecture(source.cfg, target, path)
        load_pretrained(path, target)
        assert torch.equal(target.head.bias, torch.zeros(5))
        assert torch.equal(target.head.weight, torch.zeros_like(target.head.weight))
    check_resumable(model_record(source), create_model(size, num_classes=20), path)
    source.reset_classifier(3)
    assert torch.equal(source.head.bias, torch.zeros(3))


@pytest.mark.parametrize("name", ["pretrain_in21k", "pretrain_in21k_bit", "pretrain_jft"])
def test_sigmoid_presets_start_the_head_at_minus_10(name):
    c = preset(name)
    assert (c.loss.name, c.model.head_bias_init) == ("sigmoid", -10.0)


def test_head_bias_init_must_be_finite():
    with pytest.raises(ValueError, match="head_bias_init=nan must be a finite number"):
        create_model("vit_tiny_debug", head_bias_init=float("nan"))
    with pytest.raises(ValueError, match="head_bias_init=-inf"):
        create_model("bit_tiny_debug", head_bias_init=float("-inf"))
