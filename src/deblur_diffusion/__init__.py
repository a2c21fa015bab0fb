"""Image deblurring with diffusion priors: Restormer, Swintormer and HI-Diff on Lightning + Hydra."""

from deblur_diffusion.provenance import package_version
from deblur_diffusion.restorer import Restorer, load_pretrained

__version__ = package_version()
__all__ = ["Restorer", "__version__", "load_pretrained"]
