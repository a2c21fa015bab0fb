"""Inference helpers shared by validation, evaluation and prediction."""

from deblur_diffusion.inference.tiles import Inference, tile_starts

__all__ = ["Inference", "tile_starts"]
