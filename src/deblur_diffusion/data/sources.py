"""Pair sources: where (blurry, sharp) image pairs come from.

A pair source is indexable like a dataset but returns whole images as float32 H x W x C arrays
in [0, 1]: ``load(index, rng)`` gives ``(lq, gt)`` where ``lq`` has ``in_channels`` channels (the
image to restore first, then any extra views or priors) and ``gt`` has three. Patch sampling,
augmentation and tensor conversion happen in :mod:`deblur_diffusion.data.patches`, so every source
gets them for free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class PairSource(ABC):
    """A finite, indexable collection of (blurry, sharp) pairs."""

    in_channels: int = 3
    # Whether files are decoded as cv2.imread(path) does (16-bit files as 8 bits).
    read_8bit: bool = False

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def name(self, index: int) -> str:
        """A short, unique, file-system-safe name for the pair (used for outputs)."""

    @abstractmethod
    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Returns (lq, gt). ``rng`` drives any randomness (synthetic blur); folder sources ignore it."""

    def describe(self) -> str:
        return f"{type(self).__name__} with {len(self)} pairs"

    def bit_depth(self, index: int) -> int:
        """The bit depth the pair's input is read with (what a restored image is saved and scored with)."""
        return 8

    def file_suffix(self, index: int) -> str:
        """The file extension a restored image of the pair is saved with."""
        return ".png"

    def verify(self) -> None:
        """Raises a clear error when the source cannot be read; called when its split is first used,
        so that a split the run does not use (``test=false``) may be incomplete."""
