"""LightningModules, one per training stage."""

from deblur_diffusion.stages.hidiff import HIDiffStageOne, HIDiffStageTwo
from deblur_diffusion.stages.regression import RegressionStage

__all__ = ["HIDiffStageOne", "HIDiffStageTwo", "RegressionStage"]
