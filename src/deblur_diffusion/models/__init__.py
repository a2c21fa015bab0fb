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


# The classes a network config read from a file (a checkpoint, an export folder) may name as a
# ``_target_``, by their public names and by the modules that define them: this package's networks
# and the diffusers parts of the latent prior. deblur_diffusion.weights checks every target against
# it before Hydra imports anything.
_NETWORK_MODULES = {
    "HIDiff": "deblur_diffusion.models.hidiff",
    "HIDiffStageOneNet": "deblur_diffusion.models.hidiff",
    "LatentEncoder": "deblur_diffusion.models.hidiff",
    "MixerDenoiser": "deblur_diffusion.models.hidiff",
    "MLPDenoiser": "deblur_diffusion.models.hidiff",
    "PriorDiffusion": "deblur_diffusion.models.hidiff",
    "PriorGuidedRestormer": "deblur_diffusion.models.hidiff",
    "Restormer": "deblur_diffusion.models.restormer",
    "Swintormer": "deblur_diffusion.models.swintormer",
    "LatentPriorModel": "deblur_diffusion.models.latent_prior",
    "PriorFusedNet": "deblur_diffusion.models.latent_prior",
}
NETWORK_TARGETS = frozenset(
    {f"deblur_diffusion.models.{name}" for name in _NETWORK_MODULES}
    | {f"{module}.{name}" for name, module in _NETWORK_MODULES.items()}
    | {"diffusers.VQModel", "diffusers.UNet2DModel"}
)


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
