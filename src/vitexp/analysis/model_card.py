"""The model card `vitexp.export` writes beside the weights (README.md, the way the Hugging
Face hub shows a model): architecture, position embedding, data A and B, the training
recipe, test and few-shot accuracy and the figures, read from the checkpoint and its run
directory (config.yaml, results.json, figures/), so a run can be shared as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from vitexp.data.files import write_atomic
from vitexp.training.checkpoint import run_dir_of


def _read(path: Path) -> dict[str, Any]:
    if path.suffix == ".json":
        return json.loads(path.read_text()) if path.is_file() else {}
    if path.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {}


def _get(tree: dict, dotted: str, default: Any = "?") -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "N/A"


def architecture_lines(model: nn.Module) -> list[str]:
    m = model.cfg
    params = sum(p.numel() for p in model.parameters())
    lines = [f"- size: `{m.name}`, {params / 1e6:.2f} M parameters, {model.num_classes} classes"]
    pos = getattr(m, "pos_embed", None)
    if pos is not None:
        lines += [
            f"- ViT: {m.depth} layers, width {m.embed_dim}, {m.num_heads} heads, "
            f"{m.patch_size} px patches at {tuple(m.img_size)} px, stem `{m.stem}`",
            f"- position embedding: `{pos.kind}` at `{pos.placement}`; pooling `{m.pool}`",
        ]
    return lines


def write_model_card(
    checkpoint: Path, model: nn.Module, meta: dict[str, Any], out: Path, fmt: str
) -> Path:
    run = run_dir_of(checkpoint)
    config, results = _read(run / "config.yaml"), _read(run / "results.json")
    figures = sorted((run / "figures").glob("*.png")) if (run / "figures").is_dir() else []
    if figures:
        (out / "figures").mkdir(exist_ok=True)
        for png in figures:
            shutil.copyfile(png, out / "figures" / png.name)
    metrics = results.get("metrics") or {}
    fewshot = results.get("fewshot") or {}
    stage = meta.get("stage", "?")
    weights = (
        "the weight average (EMA " + f"{meta['ema_decay']:g})"
        if meta.get("ema_decay") is not None
        else "the trained weights"
    )
    load = (
        'timm.create_model("local-dir:PATH", pretrained=True)  # PATH: this folder'
        if fmt == "timm"
        else 'torch.jit.load("PATH/model.pt")  # float images in [0, 1], any size'
        if fmt == "torchscript"
        else 'onnxruntime.InferenceSession("PATH/model.onnx")'
    )
    lines = [
        "---",
        f"library_name: {'timm' if fmt == 'timm' else 'pytorch'}",
        "tags: [image-classification, vision-transformer, vitexp]",
        "---",
        f"# {model.cfg.name} trained with vitexp ({stage})",
        "",
        "## Model",
        *architecture_lines(model),
        f"- exported weights: {weights}; format `{fmt}`",
        "",
        "## Data",
        f"- trained on: `{meta.get('data', '?')}` ({stage})",
        f"- started from: `{results.get('pretrained_data') or 'scratch'}`"
        + (f" ({results['pretrained']})" if results.get("pretrained") else ""),
        f"- training images: {results.get('train_images', '?')}",
        f"- classes: {', '.join(map(str, (meta.get('class_names') or [])[:20]))}"
        + (" ..." if len(meta.get("class_names") or []) > 20 else ""),
        "",
        "## Training recipe",
        f"- optimizer `{_get(config, 'optim.name')}`, lr {_get(config, 'optim.lr')}, weight "
        f"decay {_get(config, 'optim.weight_decay')}, schedule `{_get(config, 'schedule.name')}` "
        f"with {_get(config, 'schedule.warmup_steps')} warmup steps",
        f"- {results.get('steps', '?')} steps, global batch "
        f"{results.get('global_batch_size', '?')}, loss `{_get(config, 'loss.name')}`, "
        f"label smoothing {_get(config, 'loss.label_smoothing')}",
        f"- augmentation: RandAugment ops {_get(config, 'data.augment.randaugment.num_ops')}, "
        f"MixUp {_get(config, 'data.augment.mixup_alpha')}, CutMix "
        f"{_get(config, 'data.augment.cutmix_alpha')}; EMA {_get(config, 'ema.decay')}",
        f"- seed {results.get('seed', '?')}, wall time {results.get('wall_time_s', '?')} s",
        "",
        "## Results",
        f"- test accuracy: {_num(metrics.get('test/acc'))} "
        f"(top-5 {_num(metrics.get('test/acc_top5'))}; "
        f"{results.get('weights', 'trained')} weights)",
        *(f"- few-shot {k}: {v:.4f}" for k, v in fewshot.items()),
        "",
        "## Use",
        "```python",
        "import timm, torch" if fmt == "timm" else "import torch",
        f"model = {load}",
        "```",
    ]
    if figures:
        lines += ["", "## Figures", *(f"![{p.stem}](figures/{p.name})" for p in figures)]
    path = out / "README.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path
