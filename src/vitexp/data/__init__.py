"""Datasets, transforms and the LightningDataModule (see datamodule.py for the splits)."""

from vitexp.data.datamodule import ImageDataModule
from vitexp.data.transforms import build_transforms

__all__ = ["ImageDataModule", "build_transforms"]
