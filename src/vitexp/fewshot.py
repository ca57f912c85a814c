"""`python -m vitexp.fewshot pretrained=PATH [data=cifar10 data.root=...] [fewshot.shots=[1,5]]`:
few-shot linear accuracy of a checkpoint's model on a dataset, the metric of the paper's
Table 8 (the solver and the evaluator: `vitexp.analysis.fewshot`). Writes fewshot.json
into the checkpoint's run directory (or `out`) and prints one line per k.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vitexp.analysis.fewshot import FewShotEvaluator
from vitexp.config import FewshotConfig, validate_fewshot
from vitexp.data.config import DataConfig


@dataclass
class FewshotCommandConfig:
    pretrained: str | None = None  # a checkpoint, a run directory or a directory of runs
    out: str | None = None  # where fewshot.json goes (default: the checkpoint's run directory)
    data: DataConfig = field(default_factory=DataConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)


def evaluate_checkpoint(c: FewshotCommandConfig) -> dict:
    """Few-shot accuracy of a checkpoint's model on `c.data`; writes fewshot.json."""
    from vitexp.data.files import write_atomic
    from vitexp.errors import ConfigError
    from vitexp.training.checkpoint import read_model, resolve_pretrained, run_dir_of, weights_of

    if not c.pretrained:
        raise ConfigError("pretrained is not set; give a checkpoint: pretrained=PATH/last.ckpt")
    settings = FewshotConfig(**{**vars(c.fewshot), "data": c.data})
    validate_fewshot(settings, key="data", report=False)
    checkpoint = resolve_pretrained(c.pretrained)
    model, meta = read_model(checkpoint, "pretrained")
    evaluator = FewShotEvaluator(settings, model.img_size, model.cfg.mean, model.cfg.std)
    scores = evaluator.evaluate(model)
    out = Path(c.out) if c.out else run_dir_of(checkpoint) / "fewshot.json"
    report = {
        "pretrained": str(checkpoint),
        "weights": weights_of(meta),
        "shots": list(settings.shots),
        "draws": settings.draws,
        "l2_reg": settings.l2_reg,
        "accuracy": scores,
    }
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    for key, value in scores.items():
        print(f"{key}: {value:.4f}")
    print(f"-> {out}")
    return report


def main() -> None:
    from vitexp.training.cli import hydra_command

    hydra_command("fewshot", FewshotCommandConfig, evaluate_checkpoint)


if __name__ == "__main__":
    main()
