"""The paper's pictures of a trained ViT (Figure 6, Figure 7, Appendix D.7 and D.8), and the
numbers behind them:

    attention_maps.png        attention rollout from the output token to the input (Fig. 6)
    embedding_filters.png     top principal components of the embedding filters (Fig. 7 left)
    pos_embed_similarity.png  cosine similarity of the position embeddings (Fig. 7 centre)
    attention_distance.png    mean attention distance of every head against depth (Fig. 7 right)
    figures.json              the numbers behind them

`make_figures` draws them for uint8 images, `write_figures` writes them. `layer` (0-based,
negative counts from the end; default the last) picks the layer whose position table is drawn
next to the first one for `every_layer` placements, whose offset table is drawn for
`relative` and `relative_2d`, and whose frequencies for `rope_mixed`. The position view of
the kinds after the paper, which have no table of one vector per patch:

    rope_*       rotary phase similarity, mean over channel pairs of cos(angle_p - angle_q)
                 (Figure 7's grid of maps; mixed: per head too; _ape: the table beside it)
    relative_2d  per head, the learned bias as an image of 2-D offsets (centre = 0)
    conditional  what the PEG's conv adds to an all-ones token grid (norm, similarity)

`FiguresCallback` (which `vitexp.train` hands to the Trainer) draws them at the
end of a pretraining and logs them; `python -m vitexp.visualize` draws them of a checkpoint.
The computations are in `vitexp.analysis.viz.compute`, the drawing in
`vitexp.analysis.viz.plots`, the position view of every kind in
`vitexp.analysis.viz.positions`, the input images in `vitexp.analysis.viz.images`.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from vitexp.analysis.viz import plots
from vitexp.analysis.viz.compute import (
    attention_rollout,
    embedding_filter_pcs,
    embedding_filters,
    mean_attention_distance,
    rollout_to_patches,
    rounded,
    token_boxes,
    tokens_to_pixels,
)
from vitexp.analysis.viz.images import load_images, to_batch
from vitexp.analysis.viz.positions import pos_embed_view
from vitexp.data.files import write_atomic
from vitexp.errors import ConfigError
from vitexp.models import VisionTransformer
from vitexp.models.pos_embed import describe
from vitexp.training.checkpoint import weights_of

log = logging.getLogger("vitexp")

NUM_FILTER_PCS = 28  # the paper's Figure 7 (left)
FILES = (
    "attention_maps.png",
    "embedding_filters.png",
    "pos_embed_similarity.png",
    "attention_distance.png",
    "figures.json",
)


def resolve_layer(layer: int | None, depth: int) -> int:
    """0-based layer index; None is the last, negative counts from the end."""
    if layer is None:
        return depth - 1
    if not -depth <= layer < depth:
        raise ConfigError(
            f"layer={layer} is out of range: the model has {depth} layers, 0..{depth - 1} "
            "(negative counts from the end)"
        )
    return layer % depth


# --- the four views --------------------------------------------------------------------------
def _attention_view(model, images, names, maps, boxes) -> tuple[bytes, dict]:
    patches = rollout_to_patches(attention_rollout(maps), model.num_prefix_tokens, model.cfg.pool)
    heat = tokens_to_pixels(patches, boxes, model.img_size)
    if model.cfg.pool == "cls":
        source = "class token row of the rollout"
        title = "Attention rollout (Abnar & Zuidema): class token -> input patches"
    else:
        source = "mean of the patch tokens' rows of the rollout (GAP model: no class token)"
        title = (
            "Attention rollout (Abnar & Zuidema), GAP model without a class token:\n"
            "mean over the patch tokens' rollout rows -> input patches"
        )
    grid = model.grid_size
    data = {
        "method": "rollout R = A_L ... A_1, A_l = rownorm((mean_heads attention + I) / 2)",
        "source": source,
        "grid": list(grid),
        "maps": [rounded(m.reshape(grid)) for m in patches],
    }
    return plots.png_bytes(plots.draw_attention(images, heat, names, title)), data


def _filter_view(model) -> tuple[bytes, dict]:
    weight, hybrid_root = embedding_filters(model)
    pcs, ratio = embedding_filter_pcs(weight, NUM_FILTER_PCS)
    shape = "x".join(map(str, weight.shape[1:]))
    if hybrid_root:
        source = "ResNet root 7x7 conv (hybrid stem)"
        title = (
            f"Hybrid stem: top {len(pcs)} principal components of the ResNet root 7x7 conv "
            f"filters\n(the patch projection acts on the {model.patch_embed.proj.in_channels}"
            "-channel feature map, not on pixels)"
        )
    else:
        source = "patch embedding"
        title = (
            f"Top {len(pcs)} principal components of the {weight.shape[0]} patch-embedding "
            f"filters ({shape})"
        )
    data = {
        "source": source,
        "num_filters": int(weight.shape[0]),
        "filter_shape": list(weight.shape[1:]),
        "explained_variance_ratio": rounded(ratio),
        "components": rounded(pcs),
    }
    return plots.png_bytes(plots.draw_filters(pcs, ratio, title)), data


def _distance_view(model, maps, boxes) -> tuple[bytes, dict]:
    distance = mean_attention_distance(maps, boxes, model.num_prefix_tokens)
    images = maps[0].shape[0]
    h, w = model.img_size
    title = (
        f"Mean attention distance per head ({images} images, {h}x{w} px, "
        f"{boxes.shape[0]} patches; class token excluded)"
    )
    per_layer = distance.mean(dim=1)  # the claim: attention distance grows with depth
    data = {
        "unit": "pixels",
        "num_images": images,
        "mean_per_layer": rounded(per_layer, 3),
        "last_minus_first_layer": round(float(per_layer[-1] - per_layer[0]), 3),
        "distance": rounded(distance),
    }
    return plots.png_bytes(plots.draw_attention_distance(distance, title)), data


@torch.no_grad()
def make_figures(
    model: VisionTransformer,
    images: list[np.ndarray],
    names: list[str],
    mean,
    std,
    layer: int | None = None,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The four PNGs (file name -> bytes) and the numbers behind them, for uint8 `images`
    at the model's input size (normalised here with mean/std)."""
    layer = resolve_layer(layer, len(model.encoder.blocks))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        batch = to_batch(images, mean, std).to(param.device, param.dtype)
        maps = [m.float().cpu() for m in model.attention_maps(batch)]  # L x (B, heads, T, T)
    finally:
        model.train(was_training)
    boxes = token_boxes(model)
    c = model.cfg
    report: dict[str, Any] = {
        "model": {
            "pos_embed": describe(model.cfg.pos_embed),
            **{k: getattr(c, k) for k in ("pool", "stem", "depth", "num_heads", "embed_dim")},
            "img_size": list(model.img_size),
            "grid_size": list(model.grid_size),
            "num_prefix_tokens": model.num_prefix_tokens,
            "token_boxes_xyxy": boxes.tolist(),
        },
        "images": names,
        "layer": layer,
    }
    pngs = {}
    pngs["attention_maps.png"], report["attention_maps"] = _attention_view(
        model, images, names, maps, boxes
    )
    pngs["embedding_filters.png"], report["embedding_filters"] = _filter_view(model)
    pngs["pos_embed_similarity.png"], report["pos_embed_similarity"] = pos_embed_view(model, layer)
    pngs["attention_distance.png"], report["attention_distance"] = _distance_view(
        model, maps, boxes
    )
    return pngs, report


def write_figures(out_dir: Path, pngs: dict[str, bytes], report: dict[str, Any]) -> list[Path]:
    """Write the PNGs and figures.json (one top-level key per line) atomically."""
    out_dir = Path(out_dir)
    for name, data in pngs.items():
        write_atomic(out_dir / name, data)
    lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in report.items())
    write_atomic(out_dir / "figures.json", "{\n" + lines + "\n}\n")
    return [out_dir / name for name in (*pngs, "figures.json")]


# --- the callback ----------------------------------------------------------------------------
def log_figures(loggers, pngs: dict[str, bytes], step: int) -> None:
    """Send the PNGs to TensorBoard (`add_image`) and wandb (`log_image`); others: files only."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
    from PIL import Image

    arrays = {
        f"figures/{Path(name).stem}": np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        for name, data in pngs.items()
    }
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for tag, array in arrays.items():
                logger.experiment.add_image(tag, array, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            for tag, array in arrays.items():
                logger.log_image(key=tag, images=[array], step=step)


def draws(model_cfg: Any) -> bool:
    """The figures are the ViT paper's: attention, patch filters, position embeddings."""
    from vitexp.models import ViTConfig

    return isinstance(model_cfg, ViTConfig)


class FiguresCallback(L.Callback):
    """At the end of training (rank zero), draws the four figures of `pl_module.net` into
    `out_dir` and logs them. A failure is logged as a warning: it never costs the run."""

    def __init__(
        self,
        out_dir: Path,
        mean,
        std,
        layer: int | None = None,
        images: str | Path | None = None,
        max_images: int = 8,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.mean, self.std = list(mean), list(std)
        self.layer, self.images, self.max_images = layer, images, max_images

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or getattr(trainer, "received_sigterm", False):
            return
        try:
            net = pl_module.net
            images, names = load_images(
                self.images, net.img_size, net.cfg.in_chans, self.max_images
            )
            pngs, report = make_figures(net, images, names, self.mean, self.std, self.layer)
            weights = weights_of(getattr(pl_module, "meta", {}))
            report = {"step": trainer.global_step, "weights": weights, **report}
            write_figures(self.out_dir, pngs, report)
            log_figures(trainer.loggers, pngs, trainer.global_step)
        except Exception as err:
            log.warning("figures: not drawn (%s: %s)", type(err).__name__, err, exc_info=True)
