"""Datasets, patch sampling and the DataModule."""

from deblur_diffusion.data.datamodule import DeblurDataModule
from deblur_diffusion.data.folders import DPDD, HIDE, FolderPairs, GoPro, PairedFiles, PairListFile, RealBlur
from deblur_diffusion.data.io import read_image, write_image
from deblur_diffusion.data.schedule import ProgressiveSchedule
from deblur_diffusion.data.sources import PairSource
from deblur_diffusion.data.synthetic import SyntheticPairs

__all__ = [
    "DPDD",
    "HIDE",
    "DeblurDataModule",
    "FolderPairs",
    "GoPro",
    "PairListFile",
    "PairSource",
    "PairedFiles",
    "ProgressiveSchedule",
    "RealBlur",
    "SyntheticPairs",
    "read_image",
    "write_image",
]
