"""Restoration networks: plain ``nn.Module`` classes, one file per architecture."""

from deblur_diffusion.models.restormer import Restormer
from deblur_diffusion.models.swintormer import Swintormer

__all__ = ["Restormer", "Swintormer"]
