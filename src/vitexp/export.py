"""`python -m vitexp.export pretrained=CKPT out=DIR [format=timm|torchscript|onnx]`: a trained
model in the formats the ecosystem loads, with a model card.

    timm         model.safetensors + config.json in timm's hub format: in any Python with
                 timm, `timm.create_model("local-dir:DIR")` rebuilds it (architecture,
                 num_classes, model_args, pretrained_cfg with the class names and the
                 preprocessing). ViTs whose computation timm has: a learned 1-D table at
                 the stem (VisionTransformer; the patch or the R50 hybrid stem), RoPE-Axial
                 or RoPE-Mixed with or without that table (Eva, RoPE-ViT's models), the 2-D
                 relative bias per block or shared (Beit); class token or GAP, LayerScale,
                 any size, patch size and resolution, no pre-logits layer. The rest
                 (learned_2d, relative, sincos_2d, conditional, every-layer placements)
                 are refused in one line: export format=torchscript.
    torchscript  model.pt: the model with its preprocessing (resize to its input size,
                 normalise), taking float images in [0, 1] of any size.
    onnx         model.onnx: the same graph (needs the `onnx` package).

Every format exports the checkpoint's `state_dict`: the weight average where the run kept
one. README.md beside the weights is the model card (`vitexp.analysis.model_card`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitexp.errors import ConfigError
from vitexp.models.convert import TIMM_HYBRID_WS_EPS, rename_hybrid, restandardize
from vitexp.models.patch_embed import to_2tuple
from vitexp.models.pos_embed import ROPE_KINDS

FORMATS = ("timm", "torchscript", "onnx")


def pair(value: Any, name: str) -> list[int]:
    """An int or (h, w) as [h, w], the JSON form timm's config takes."""
    return list(to_2tuple(value, name))


# registered timm names per stem; model_args set every size
TIMM_ARCHITECTURE = {"patch": "vit_base_patch16_224", "r50": "vit_base_r50_s16_224"}
TIMM_FIRST_CONV = {"patch": "patch_embed.proj", "r50": "patch_embed.backbone.stem.conv"}
# the position encodings timm has, and its class for each (the rest: format=torchscript)
TIMM_CLASS = {
    "learned_1d": "VisionTransformer",
    **{kind: "Eva" for kind in ROPE_KINDS},  # RoPE-ViT's models
    "relative_2d": "Beit",  # BEiT's per-block or shared relative position bias
}


@dataclass
class ExportCommandConfig:
    pretrained: str | None = None  # a checkpoint, a run directory or a directory of runs
    out: str | None = None  # a directory (created)
    format: str = "timm"


def _timm_class(model: nn.Module) -> str:
    """timm's class for the model's variant; a variant timm lacks raises ConfigError."""
    from vitexp.models import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"format=timm exports ViTs; this is a {model.cfg.name} model (use format=torchscript)"
        )
    m = model.cfg
    timm_class = TIMM_CLASS.get(m.pos_embed.kind)
    if m.pos_embed.placement != "stem":
        timm_class = None
    lacks = []
    if timm_class is None:
        lacks.append(f"position embedding {m.pos_embed.kind}/{m.pos_embed.placement}")
    stride = m.patch_stride
    if stride is not None and pair(stride, "patch_stride") != pair(m.patch_size, "patch_size"):
        lacks.append(f"overlapping patches (patch_stride={m.patch_stride})")
    if m.representation_size is not None:
        lacks.append("a pre-logits layer (representation_size)")
    if m.norm_eps != 1e-6:
        lacks.append(f"norm_eps={m.norm_eps}")
    if timm_class == "Beit" and not m.class_token:
        lacks.append("2-D relative bias without a class token")
    elif m.class_token != (m.pool == "cls") and timm_class != "Beit":
        lacks.append(f"pool={m.pool} with class_token={m.class_token}")
    if timm_class in ("Eva", "Beit") and m.stem != "patch":
        lacks.append(f"stem={m.stem} with {m.pos_embed.kind}")
    if lacks:
        name = timm_class or "VisionTransformer"
        raise ConfigError(
            f"format=timm: timm's {name} has no {', '.join(lacks)}; "
            "export format=torchscript instead"
        )
    return timm_class


def timm_target(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The registered timm architecture and the arguments with which it computes what
    `model` computes; a variant timm does not have raises ConfigError naming it."""
    timm_class = _timm_class(model)
    m = model.cfg
    args = {
        "img_size": pair(m.img_size, "img_size"),
        "patch_size": pair(m.patch_size, "patch_size"),
        "in_chans": m.in_chans,
        "embed_dim": m.embed_dim,
        "depth": m.depth,
        "num_heads": m.num_heads,
        "mlp_ratio": m.mlp_ratio,
        "qkv_bias": m.qkv_bias,
        "global_pool": "token" if m.pool == "cls" else "avg",
        "init_values": m.layer_scale_init,  # LayerScale (None: none)
    }
    if timm_class == "VisionTransformer":
        args |= {"class_token": m.pool == "cls", "fc_norm": bool(m.fc_norm)}
        return TIMM_ARCHITECTURE[m.stem], args
    if timm_class == "Beit":
        shared = m.pos_embed.shared
        args |= {
            "use_fc_norm": bool(m.fc_norm),
            "use_abs_pos_emb": False,
            "use_rel_pos_bias": not shared,
            "use_shared_rel_pos_bias": shared,
        }
        return "beit_base_patch16_224", args
    kind = m.pos_embed.kind
    mixed, ape = kind.startswith("rope_mixed"), kind.endswith("_ape")
    args |= {
        "class_token": m.class_token,
        "use_fc_norm": bool(m.fc_norm),
        "attn_type": "rope",
        "use_abs_pos_emb": ape,
        "no_embed_class": ape,  # the class token's row is folded into cls_token
        "use_rot_pos_emb": True,
        "rope_type": "mixed" if mixed else "cat",
        "rope_temperature": m.pos_embed.theta,
        "rope_grid_indexing": "xy",
    }
    return f"vit_base_patch16_rope{'_mixed' if mixed else ''}{'_ape' if ape else ''}_224", args


# vitexp's names -> timm's inside a block, per timm class (VisionTransformer keeps ours)
TIMM_BLOCK_NAMES = {
    "Eva": {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"},
    "Beit": {
        "ls1.gamma": "gamma_1",
        "ls2.gamma": "gamma_2",
        "attn.rel_pos.table": "attn.relative_position_bias_table",
    },
}


def timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """vitexp's ViT weights under timm's names (the inverse of models.convert)."""
    timm_class = _timm_class(model)
    renames = TIMM_BLOCK_NAMES.get(timm_class, {})
    state = model.state_dict()
    # timm's Eva puts no table row on the class token (no_embed_class): for the `_ape` kinds
    # that row, a constant, joins the class token itself
    fold = timm_class == "Eva" and "encoder.pos_embeds.0.weight" in state and "cls_token" in state
    prefix = model.num_prefix_tokens
    out = {}
    for key, value in state.items():
        if key == "encoder.pos_embeds.0.weight":
            if fold:
                out["cls_token"] = state["cls_token"] + value[:, :prefix]
                value = value[:, prefix:]
            out["pos_embed"] = value
        elif key == "cls_token" and fold:
            continue  # written with the table's row, above
        elif key == "encoder.rope.freqs":
            out["rope.freqs"] = value
        elif key == "encoder.shared_rel_pos.table":
            out["rel_pos_bias.relative_position_bias_table"] = value
        elif timm_class == "Beit" and key.endswith(".attn.qkv.bias"):
            # BEiT has no key bias; a key bias adds q.b_k to every logit of a query's row,
            # which the softmax cancels, so dropping it is exact
            dim = value.shape[0] // 3
            block = key.removesuffix("qkv.bias").removeprefix("encoder.")
            out[block + "q_bias"], out[block + "v_bias"] = value[:dim], value[2 * dim :]
        elif key.startswith("encoder."):
            key = key.removeprefix("encoder.")
            for ours, theirs in renames.items():
                key = key.replace(f".{ours}", f".{theirs}")
            out[key] = value
        elif key.startswith("patch_embed.backbone."):
            if value.dim() == 4:  # a weight-standardised conv
                conv = model.get_submodule(key.removesuffix(".weight"))
                value = restandardize(value, conv.eps, TIMM_HYBRID_WS_EPS)
            out[rename_hybrid(key, to_timm=True)] = value
        else:
            out[key] = value
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def export_timm(model: nn.Module, meta: dict[str, Any], out: Path) -> list[Path]:
    from safetensors.torch import save_file

    from vitexp.data.files import write_atomic

    architecture, args = timm_target(model)
    names = meta.get("class_names") or [str(i) for i in range(model.num_classes)]
    config = {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "num_features": model.embed_dim,
        "model_args": args,
        "pretrained_cfg": {
            "num_classes": model.num_classes,
            "input_size": [args["in_chans"], *args["img_size"]],
            "interpolation": "bilinear",
            "crop_pct": meta.get("eval_crop_pct", 0.875),
            "crop_mode": "center",
            "mean": list(model.cfg.mean),
            "std": list(model.cfg.std),
            "first_conv": TIMM_FIRST_CONV[model.cfg.stem],
            "classifier": "head",
            "label_names": list(names),
        },
    }
    weights = out / "model.safetensors"
    save_file(timm_state_dict(model), str(weights))
    write_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    return [weights, out / "config.json"]


class WithPreprocessing(nn.Module):
    """images (B, C, H, W), float in [0, 1], any H and W -> logits: resized to the model's
    input size (bilinear, antialiased) and normalised by its mean and std."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.size = tuple(int(s) for s in model.img_size)
        self.register_buffer("mean", torch.tensor(model.cfg.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(model.cfg.std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=self.size, mode="bilinear", antialias=True)
        return self.model((x - self.mean) / self.std)


def example_input(model: nn.Module) -> torch.Tensor:
    h, w = (int(s) for s in model.img_size)
    return torch.rand(
        2, model.cfg.in_chans, h + 8, w + 8, generator=torch.Generator().manual_seed(0)
    )


def export_torchscript(model: nn.Module, meta: dict[str, Any], out: Path) -> list[Path]:
    wrapped = WithPreprocessing(model).eval()
    example = example_input(model)
    with torch.no_grad(), warnings.catch_warnings():
        # torch's deprecation notice, and the tracer's note that the patch embedding's size
        # check becomes a constant: the graph resizes every input to that size first
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapped, example)
        check = torch.rand_like(example[:1])
        torch.testing.assert_close(traced(check), wrapped(check), rtol=1e-4, atol=1e-5)
    path = out / "model.pt"
    tmp = path.with_suffix(".pt.partial")
    traced.save(str(tmp))
    tmp.replace(path)
    return [path]


def export_onnx(model: nn.Module, meta: dict[str, Any], out: Path) -> list[Path]:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError(
            "format=onnx needs the onnx package (pip install onnx onnxscript, or vitexp[onnx]); "
            "format=torchscript works without it"
        ) from None
    path = out / "model.onnx"
    torch.onnx.export(
        WithPreprocessing(model).eval(),
        (example_input(model),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
    )
    return [path]


def export(c: ExportCommandConfig) -> list[Path]:
    """Write the chosen format and the model card into `c.out`; returns the files."""
    from vitexp.analysis.model_card import write_model_card
    from vitexp.training.checkpoint import read_model, resolve_pretrained

    if not c.pretrained:
        raise ConfigError("pretrained is not set; give a checkpoint: pretrained=PATH/last.ckpt")
    if not c.out:
        raise ConfigError("out is not set; give a directory: out=exported/")
    if c.format not in FORMATS:
        raise ConfigError(f"format={c.format!r} is not allowed; choose one of {', '.join(FORMATS)}")
    checkpoint = resolve_pretrained(c.pretrained)
    model, meta = read_model(checkpoint, "pretrained")
    if c.format == "timm":
        timm_target(model)  # a variant timm lacks stops before anything is written
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    writer = {"timm": export_timm, "torchscript": export_torchscript, "onnx": export_onnx}
    files = writer[c.format](model, meta, out)
    files.append(write_model_card(checkpoint, model, meta, out, c.format))
    for path in files:
        print(f"-> {path}")
    return files


def main() -> None:
    from vitexp.training.cli import hydra_command

    hydra_command("export", ExportCommandConfig, export)


if __name__ == "__main__":
    main()
