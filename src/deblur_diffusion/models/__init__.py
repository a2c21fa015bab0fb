"""Restoration networks: plain ``nn.Module`` classes, one file per architecture.

The latent-diffusion parts (``LatentPriorModel``, ``PriorFusedNet``, ``load_compvis_ldm``) import
diffusers, which takes seconds: they are imported on first use, so Restormer and HI-Diff users never
load it.
"""

import importlib

from deblur_diffusion.models.hidiff import (
    HIDiff,
    HIDiffStageOneNet,
    LatentEncoder,
    MixerDenoiser,
    MLPDenoiser,
    PriorDiffusion,
    PriorGuidedRestormer,
)
from deblur_diffusion.models.restormer import Restormer
from deblur_diffusion.models.swintormer import Swintormer

_DIFFUSERS_BASED = {
    "LatentPriorModel": "deblur_diffusion.models.latent_prior",
    "PriorFusedNet": "deblur_diffusion.models.latent_prior",
    "load_compvis_ldm": "deblur_diffusion.models.compvis_ldm",
}


def __getattr__(name: str):
    if name in _DIFFUSERS_BASED:
        return getattr(importlib.import_module(_DIFFUSERS_BASED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
