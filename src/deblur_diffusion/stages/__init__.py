"""LightningModules, one per training stage."""

from deblur_diffusion.stages.hidiff import HIDiffStageOne, HIDiffStageTwo
from deblur_diffusion.stages.latent_prior import (
    AutoencoderStage,
    DecoderFinetuneStage,
    LatentDiffusionStage,
    PriorFusedStage,
)
from deblur_diffusion.stages.regression import RegressionStage

__all__ = [
    "AutoencoderStage",
    "DecoderFinetuneStage",
    "HIDiffStageOne",
    "HIDiffStageTwo",
    "LatentDiffusionStage",
    "PriorFusedStage",
    "RegressionStage",
]
