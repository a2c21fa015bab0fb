"""Image deblurring with diffusion priors: Restormer, Swintormer and HI-Diff on Lightning + Hydra."""

from deblur_diffusion.restorer import Restorer, load_pretrained

__all__ = ["Restorer", "load_pretrained"]
