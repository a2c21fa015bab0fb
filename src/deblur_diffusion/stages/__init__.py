"""LightningModules, one per training stage."""

from deblur_diffusion.stages.regression import RegressionStage

__all__ = ["RegressionStage"]
