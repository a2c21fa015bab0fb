"""Restoration networks: plain ``nn.Module`` classes, one file per architecture."""

from deblur_diffusion.models.compvis_ldm import load_compvis_ldm
from deblur_diffusion.models.hidiff import (
    HIDiff,
    HIDiffStageOneNet,
    LatentEncoder,
    MixerDenoiser,
    MLPDenoiser,
    PriorDiffusion,
    PriorGuidedRestormer,
)
from deblur_diffusion.models.latent_prior import LatentPriorModel, PriorFusedNet
from deblur_diffusion.models.restormer import Restormer
from deblur_diffusion.models.swintormer import Swintormer

__all__ = [
    "HIDiff",
    "HIDiffStageOneNet",
    "LatentEncoder",
    "LatentPriorModel",
    "MLPDenoiser",
    "MixerDenoiser",
    "PriorDiffusion",
    "PriorFusedNet",
    "PriorGuidedRestormer",
    "Restormer",
    "Swintormer",
    "load_compvis_ldm",
]
