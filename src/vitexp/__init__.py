"""vitexp: pretrain a ViT on A, fine-tune on B, run the paper's ablations and figures.

`vitexp.load_model(path)` gives the model of any vitexp checkpoint, ready for evaluation.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    # loaded on first use: `import vitexp.models` alone stays free of Lightning
    if name == "load_model":
        from vitexp.training.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'vitexp' has no attribute {name!r}")
