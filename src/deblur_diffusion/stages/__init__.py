"""LightningModules, one per training stage.

The latent-diffusion stages import diffusers: they are imported on first use (see
:mod:`deblur_diffusion.models`).
"""

import importlib

from deblur_diffusion.stages.hidiff import HIDiffStageOne, HIDiffStageTwo
from deblur_diffusion.stages.regression import RegressionStage

_DIFFUSERS_BASED = ("AutoencoderStage", "DecoderFinetuneStage", "LatentDiffusionStage", "PriorFusedStage")


def __getattr__(name: str):
    if name in _DIFFUSERS_BASED:
        return getattr(importlib.import_module("deblur_diffusion.stages.latent_prior"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AutoencoderStage",
    "DecoderFinetuneStage",
    "HIDiffStageOne",
    "HIDiffStageTwo",
    "LatentDiffusionStage",
    "PriorFusedStage",
    "RegressionStage",
]
