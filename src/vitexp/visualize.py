"""The paper's pictures of a trained ViT (Figure 6, Figure 7, Appendix D.7 and D.8).

    python -m vitexp.visualize pretrained=PATH [images=DIR] [out=DIR] [layer=N]

writes to `out` (default: `figures/` in the run directory, beside `checkpoints/`):
attention_maps.png, embedding_filters.png, pos_embed_similarity.png,
attention_distance.png and figures.json, the numbers behind them
(`vitexp.analysis.figures`). Images: scikit-learn's two bundled photographs unless
`images=DIR`. `layer` (0-based, negative counts from the end; default the last) picks the
layer whose position table is drawn next to the first one for `every_layer` placements,
whose offset table is drawn for `relative` and `relative_2d`, and whose frequencies for
`rope_mixed`. What the position view draws for the kinds after the paper
(`vitexp.analysis.viz.positions`):

    rope_axial, rope_mixed   the rotary phase similarity of each patch to every other (mean
                             over channel pairs of cos(angle_p - angle_q)), Figure 7's grid
                             of maps; axial is the same in every layer, mixed per head
    rope_*_ape               the same, with the learned 1-D table's similarity beside it
    relative_2d              per head, the learned bias as a (2H-1) x (2W-1) image of
                             offsets query - key, of `layer`'s table or the shared one
    conditional              what the PEG's conv adds to an all-ones token grid: its norm
                             per patch and the similarity of the additions (the border)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitexp.analysis.figures import draws, make_figures, resolve_layer, write_figures
from vitexp.analysis.viz.images import load_images
from vitexp.errors import ConfigError
from vitexp.training.checkpoint import run_dir_of, weights_of


@dataclass
class VisualizeCommandConfig:
    pretrained: str | None = None  # a checkpoint, a run directory or a directory of runs
    images: str | None = None  # a folder of images (default: scikit-learn's two samples)
    out: str | None = None  # default: <run dir>/figures beside checkpoints/
    layer: int | None = None  # position table / offsets / RoPE of this layer (default last)
    max_images: int = 8  # the first images of `images` (by name)


def default_out(pretrained: Path) -> Path:
    """`figures/` in the run directory: beside `checkpoints/`, else beside the file."""
    return run_dir_of(pretrained) / "figures"


def visualize_checkpoint(c: VisualizeCommandConfig) -> dict[str, Any]:
    """Draw the figures of a checkpoint's model; returns figures.json's content."""
    if not c.pretrained:
        raise ConfigError("pretrained is not set; give a checkpoint: pretrained=PATH/last.ckpt")
    if c.max_images < 1:
        raise ConfigError(f"max_images={c.max_images} must be >= 1")
    from vitexp.training.checkpoint import read_model, resolve_pretrained

    checkpoint = resolve_pretrained(c.pretrained)
    model, meta = read_model(checkpoint, "pretrained")
    if not draws(model.cfg):
        raise ConfigError(
            f"pretrained={checkpoint} is a {model.cfg.name} model; the figures (attention, "
            "patch filters, position embeddings) are drawn for ViT checkpoints only"
        )
    resolve_layer(c.layer, len(model.encoder.blocks))  # fail before reading any image
    images, names = load_images(c.images, model.img_size, model.cfg.in_chans, c.max_images)
    pngs, report = make_figures(model, images, names, model.cfg.mean, model.cfg.std, c.layer)
    report = {"pretrained": str(checkpoint), "weights": weights_of(meta), **report}
    out = Path(c.out) if c.out else default_out(checkpoint)
    try:
        paths = write_figures(out, pngs, report)
    except OSError as err:
        raise ConfigError(f"out={out} cannot be written: {err.strerror or err}") from None
    for path in paths:
        print(f"-> {path}")
    return report


def main() -> None:
    from vitexp.training.cli import hydra_command

    hydra_command("visualize", VisualizeCommandConfig, visualize_checkpoint)


if __name__ == "__main__":
    main()
