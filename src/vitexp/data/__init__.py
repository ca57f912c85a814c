"""Datasets, transforms and the LightningDataModule (see datamodule.py for the splits), the
data's configs (`DataConfig`, `AugmentConfig` and their checks: config.py), packing
(pack.py) and atomic file writes (files.py).

ImageDataModule and build_transforms are imported on first use: a command that needs only a
source or a config (vitexp.pack, vitexp.config) does not pay for Lightning's import."""

from typing import Any

from vitexp.data.config import AugmentConfig, DataConfig

__all__ = ["AugmentConfig", "DataConfig", "ImageDataModule", "build_transforms"]


def __getattr__(name: str) -> Any:
    if name == "ImageDataModule":
        from vitexp.data.datamodule import ImageDataModule

        return ImageDataModule
    if name == "build_transforms":
        from vitexp.data.transforms import build_transforms

        return build_transforms
    raise AttributeError(f"module 'vitexp.data' has no attribute {name!r}")
