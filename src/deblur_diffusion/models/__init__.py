"""Restoration networks: plain ``nn.Module`` classes, one file per architecture."""

from deblur_diffusion.models.restormer import Restormer

__all__ = ["Restormer"]
