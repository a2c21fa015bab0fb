"""Pair sources: where (blurry, sharp) image pairs come from.

A pair source is indexable like a dataset but returns whole images as float32 H x W x C arrays
in [0, 1]: ``load(index, rng)`` gives ``(lq, gt)`` where ``lq`` has ``in_channels`` channels (the
image to restore first, then any extra views or priors) and ``gt`` has three. Patch sampling,
augmentation and tensor conversion happen in :mod:`deblur_diffusion.data.patches`, so every source
gets them for free.

Training reads ``load_planes(index, rng)`` instead: the same pair as stored (uint8/uint16 planes of
three channels, possibly views of a memory map), so that a patch is cut before anything is
converted to float.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from deblur_diffusion.data.io import to_float


class PairPlanes(NamedTuple):
    """A pair as stored: the input planes (H x W x 3 each: the image to restore, then extra views,
    then any prior), concatenated on channels by :meth:`to_float`, and the target."""

    inputs: list[np.ndarray]
    target: np.ndarray

    def map(self, transform: Callable[[np.ndarray], np.ndarray]) -> PairPlanes:
        """The same transform (crop, flip, turn) applied to every plane."""
        return PairPlanes([transform(plane) for plane in self.inputs], transform(self.target))

    def to_float(self) -> tuple[np.ndarray, np.ndarray]:
        """(lq, gt) as float32 in [0, 1], the planes of lq concatenated on channels."""
        inputs = [to_float(plane) for plane in self.inputs]
        lq = inputs[0] if len(inputs) == 1 else np.concatenate(inputs, axis=2)
        return lq, to_float(self.target)


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

    def load_planes(self, index: int, rng: np.random.Generator) -> PairPlanes:
        """The pair as stored, for training crops; sources that generate float images return
        ``load`` as a single plane."""
        lq, gt = self.load(index, rng)
        return PairPlanes([lq], gt)

    def sharpness_target(self, index: int) -> np.ndarray:
        """The target as the official crop scripts rank crop sharpness on it: at its stored bit
        depth, whatever ``read_8bit`` (``generate_patches_dpdd.py`` reads ``cv2.imread(path, -1)``)."""
        return self.load_planes(index, np.random.default_rng(index)).target

    def describe(self) -> str:
        return f"{type(self).__name__} with {len(self)} pairs"

    def provenance(self) -> dict:
        """What the pairs' pixels come from, independent of where the files lie (a prepared store
        records it and refuses other sources): by default the description."""
        return {"source": self.describe()}

    def bit_depth(self, index: int) -> int:
        """The bit depth the pair's input is read with (what a restored image is saved and scored with)."""
        return 8

    def files(self, index: int) -> list[Path]:
        """The files a pair is read from (none for generated pairs); recorded by prepared stores."""
        return []

    def file_suffix(self, index: int) -> str:
        """The file extension a restored image of the pair is saved with."""
        return ".png"

    def verify(self) -> None:  # noqa: B027 - a hook: most sources have nothing to check
        """Raises a clear error when the source cannot be read; called when its split is first used,
        so that a split the run does not use (``test=false``) may be incomplete."""


class StoredPairSource(PairSource):
    """A source of stored pixels (files, a crop store): it provides :meth:`load_planes`, and
    :meth:`load` is those planes as float."""

    @abstractmethod
    def load_planes(self, index: int, rng: np.random.Generator | None = None) -> PairPlanes: ...

    def load(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.load_planes(index, rng).to_float()


class PairSubset(PairSource):
    """Some pairs of another source, in their order (a held-out validation split and the training
    pairs left; see ``DeblurDataModule(val_fraction=...)``)."""

    def __init__(self, source: PairSource, indices: list[int], role: str):
        self.source = source
        self.indices = list(indices)
        self.role = role
        self.in_channels = source.in_channels
        self.read_8bit = source.read_8bit

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, index: int) -> str:
        return self.source.name(self.indices[index])

    def load(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.source.load(self.indices[index], rng)

    def load_planes(self, index: int, rng: np.random.Generator | None = None) -> PairPlanes:
        return self.source.load_planes(self.indices[index], rng)

    def sharpness_target(self, index: int) -> np.ndarray:
        return self.source.sharpness_target(self.indices[index])

    def bit_depth(self, index: int) -> int:
        return self.source.bit_depth(self.indices[index])

    def files(self, index: int) -> list[Path]:
        return self.source.files(self.indices[index])

    def file_suffix(self, index: int) -> str:
        return self.source.file_suffix(self.indices[index])

    def verify(self) -> None:
        self.source.verify()

    def describe(self) -> str:
        return f"{self.source.describe()}, {self.role}: {len(self)} of its pairs"

    def provenance(self) -> dict:
        indices = ",".join(str(index) for index in self.indices)
        return {**self.source.provenance(), "subset": self.role, "subset_sha1": hashlib.sha1(indices.encode()).hexdigest()}
