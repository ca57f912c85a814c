"""`python -m vitexp.evaluate pretrained=CKPT resolutions=[24,32,48,64] [patch_sizes=[4,7]]
[rope_positions=extrapolate|interpolate] [data=NAME] [out=FILE.json]`: top-1 accuracy of a
checkpoint at other test resolutions (and patch sizes), without fine-tuning.

Each resolution (x patch size) scores a fresh copy of the model, resized (position tables
interpolated, the patch projection resampled FlexiViT's way), on the test split of the
run's own data (its config.yaml) or of `data=NAME`, with the run's eval transform at that
resolution (`vitexp.analysis.resolution`). At the training resolution the accuracy is the
run's own results.json `test/acc` (`weights=raw`: its `metrics_raw`). Writes
resolutions.json into the run directory (or `out`) and prints one line per result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitexp.analysis import resolution as res
from vitexp.data.config import DataConfig
from vitexp.errors import ConfigError
from vitexp.models.rope import ROPE_POSITIONS


@dataclass
class EvaluateCommandConfig:
    pretrained: str | None = None  # a checkpoint, a run directory or a directory of runs
    resolutions: Any = None  # test resolutions: ints (square) or [height, width]
    patch_sizes: Any = None  # default: the checkpoint's (others: FlexiViT resampling)
    rope_positions: str | None = None  # RoPE models: extrapolate | interpolate
    weights: str = "averaged"  # averaged (the EMA, where the run kept one) | raw
    data: DataConfig | None = None  # default: the run's own (its config.yaml)
    out: str | None = None  # default: <run dir>/resolutions.json
    device: str | None = None  # default: cuda when there is one, else cpu


def evaluate(c: EvaluateCommandConfig) -> dict[str, Any]:
    """Score a checkpoint at each resolution; writes resolutions.json and returns it."""
    import torch

    from vitexp.data.files import write_atomic
    from vitexp.training.checkpoint import (
        RAW_WEIGHTS_KEY,
        model_from,
        read_checkpoint,
        resolve_pretrained,
        run_dir_of,
        weights_of,
    )

    if not c.pretrained:
        raise ConfigError("pretrained is not set; give a checkpoint: pretrained=PATH/last.ckpt")
    if c.resolutions is None:
        raise ConfigError("resolutions is not set; give test resolutions: resolutions=[24,32,48]")
    resolutions = res.sizes(c.resolutions, "resolutions")
    patch_sizes = None if c.patch_sizes is None else res.sizes(c.patch_sizes, "patch_sizes")
    if c.rope_positions is not None and c.rope_positions not in ROPE_POSITIONS:
        raise ConfigError(
            f"rope_positions={c.rope_positions!r}: choose {' or '.join(ROPE_POSITIONS)}"
        )
    if c.weights not in ("averaged", "raw"):
        raise ConfigError(f"weights={c.weights!r}: choose averaged or raw")
    checkpoint = resolve_pretrained(c.pretrained)
    content = read_checkpoint(checkpoint, "pretrained")
    raw = c.weights == "raw" and RAW_WEIGHTS_KEY in content
    if raw:  # the trained weights of a run that kept an average
        content = {**content, "state_dict": content[RAW_WEIGHTS_KEY]}
    model, meta = model_from(content, checkpoint, "pretrained")
    run = res.run_data(run_dir_of(checkpoint), c.data)
    device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = res.evaluate_resolutions(
        model, run, resolutions, patch_sizes, c.rope_positions, device
    )
    pos = getattr(model.cfg, "pos_embed", None)
    train_patch = getattr(model.cfg, "patch_size", None)
    report = {
        "pretrained": str(checkpoint),
        "weights": "trained" if raw else weights_of(meta),
        "model": model.cfg.name,
        "variant": None if pos is None else {"kind": pos.kind, "placement": pos.placement},
        "train_resolution": list(model.img_size),
        "train_patch_size": train_patch,
        "rope_positions": c.rope_positions,
        "data": run.data.name,
        "precision": res.resolve_precision(run.precision, device),
        "results": results,
    }
    out = Path(c.out) if c.out else run_dir_of(checkpoint) / res.RESULTS
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    for record in results:
        print(res.result_line(record, (tuple(model.img_size), train_patch)))
    print(f"-> {out}")
    return report


def main() -> None:
    from vitexp.training.cli import hydra_command

    hydra_command("evaluate", EvaluateCommandConfig, evaluate)


if __name__ == "__main__":
    main()
