"""What every model family's config shares: its name, the input normalisation it expects,
and the key-by-key comparison that checkpoints use.

A family's config subclasses `ModelConfig` and lists, as class attributes, `ARCHITECTURE`
(what a pretrained checkpoint and the model fine-tuned from it must agree on) and `RESUME`
(what a resumed run must also keep).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class ModelConfig:
    """name: the size it was made from (`vitexp.models.factory.SIZES`), for records.
    mean, std: the input normalisation the model expects (the paper's code: [-1, 1])."""

    name: str = "model"
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    # class attributes, not fields: each family lists its own
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ()
    RESUME: ClassVar[tuple[str, ...]] = ()

    def check_mean_std(self, channels: int) -> None:
        """mean/std give one value per input channel."""
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} values (in_chans)")

    def differences(self, other: ModelConfig, keys: Sequence[str]) -> list[tuple[str, Any, Any]]:
        """(key, self's value, other's value) for each of `keys` (dotted) that differs."""
        out = []
        for key in keys:
            a, b = self, other
            for part in key.split("."):
                a, b = getattr(a, part), getattr(b, part)
            if _as_tuple(a) != _as_tuple(b):
                out.append((key, a, b))
        return out


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value
