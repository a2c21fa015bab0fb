"""Where the official training crops of an image lie, and which are kept.

The official pipelines never train from full frames: they first cut each training image into
512 px crops (GoPro and the other motion-blur sets: every 256 px; DPDD: every 204 px, keeping the
70 % sharpest crops of each image, ranked by Restormer's ``generate_patches_dpdd.py`` score).
:mod:`deblur_diffusion.data.store_writer` writes those crops into a store.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from deblur_diffusion.errors import ConfigError

# Restormer's generate_patches_dpdd.py: Sobel kernel sizes whose sharpness scores are multiplied.
SHARPNESS_KERNEL_SIZES = (3, 7, 11, 15)


@dataclass(frozen=True)
class CropRule:
    """Where the crops of an image lie, and which are kept.

    Along each axis, crops start every ``stride`` pixels while they fit, plus one flush with the far
    border (the official scripts' rule: GoPro 512/256, DPDD 512/204); an image smaller than ``size``
    gives one crop of its whole extent. ``keep_sharpest`` < 1 keeps that fraction of each image's
    crops, dropping the least sharp target crops first (DPDD: 0.7).
    """

    size: int = 512
    stride: int = 256
    keep_sharpest: float = 1.0

    def __post_init__(self):
        if self.size < 1 or self.stride < 1:
            raise ConfigError(f"crop size and stride must be positive, got size={self.size} stride={self.stride}")
        if not 0.0 < self.keep_sharpest <= 1.0:
            raise ConfigError(f"crops.keep_sharpest must be in (0, 1], got {self.keep_sharpest}")

    def starts(self, length: int) -> list[int]:
        if length <= self.size:
            return [0]
        return sorted({*range(0, length - self.size + 1, self.stride), length - self.size})

    def windows(self, height: int, width: int) -> list[tuple[int, int]]:
        """(top, left) of every crop, row by row."""
        return [(top, left) for top in self.starts(height) for left in self.starts(width)]

    def kept(self, target_crops: list[np.ndarray]) -> list[bool]:
        """Which crops survive the sharpness filter (all of them when ``keep_sharpest`` is 1)."""
        count = len(target_crops)
        dropped = int((1.0 - self.keep_sharpest) * count + 1e-9)
        if dropped == 0:
            return [True] * count
        scores = sharpness_scores(target_crops)
        # Stable: among equal scores the earlier crop is dropped first, as the official argmin loop does.
        least_sharp = np.argsort(scores, kind="stable")[:dropped]
        keep = [True] * count
        for index in least_sharp:
            keep[index] = False
        return keep


def sharpness_scores(target_crops: list[np.ndarray]) -> np.ndarray:
    """Restormer's DPDD crop sharpness: for each Sobel kernel size, the sum over the gray crop of the
    gradient magnitude, min-max normalised over the image's crops; the product over kernel sizes.
    A kernel size at which every crop scores the same contributes NaN, as in the official script,
    which then drops crops in order."""
    grays = [cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY) for crop in target_crops]
    product = np.ones(len(grays))
    for ksize in SHARPNESS_KERNEL_SIZES:
        sums = np.array([_gradient_magnitude_sum(gray, ksize) for gray in grays])
        shifted = sums - sums.min()
        with np.errstate(invalid="ignore", divide="ignore"):
            product = product * (shifted / shifted.max())
    return np.nan_to_num(product, nan=-1.0)


def _gradient_magnitude_sum(gray: np.ndarray, ksize: int) -> float:
    dx = cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=ksize)
    dy = cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=ksize)
    return float(np.sqrt(dx * dx + dy * dy).sum())
