"""Datasets, transforms and the LightningDataModule (see datamodule.py for the splits).

The names below are imported on first use: a command that needs only a source (vitexp.pack)
does not pay for Lightning's import."""

from typing import Any

__all__ = ["ImageDataModule", "build_transforms"]


def __getattr__(name: str) -> Any:
    if name == "ImageDataModule":
        from vitexp.data.datamodule import ImageDataModule

        return ImageDataModule
    if name == "build_transforms":
        from vitexp.data.transforms import build_transforms

        return build_transforms
    raise AttributeError(f"module 'vitexp.data' has no attribute {name!r}")
