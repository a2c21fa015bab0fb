"""Torch datasets over pair sources: random training patches and whole evaluation images.

Training items are requested by key ``(index, patch_size, seed)``: the batch sampler decides the
patch size (progressive training) and a per-sample seed, so crops and augmentations are a pure
function of the key, identical whatever the number of workers or which worker loads the item.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from deblur_diffusion.data.sources import PairSource
from deblur_diffusion.errors import PairMismatchError


class PatchKey(NamedTuple):
    index: int
    patch_size: int
    seed: int


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x C float array to a C x H x W tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def load_checked(source: PairSource, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Loads a pair and checks its layout against what the source promises."""
    lq, gt = source.load(index, rng)
    if lq.shape[:2] != gt.shape[:2]:
        raise PairMismatchError(
            f"pair {source.name(index)!r}: input is {lq.shape[0]}x{lq.shape[1]}, target {gt.shape[0]}x{gt.shape[1]}"
        )
    if lq.shape[2] != source.in_channels or gt.shape[2] != 3:
        raise PairMismatchError(
            f"pair {source.name(index)!r}: expected {source.in_channels} input and 3 target channels, "
            f"got {lq.shape[2]} and {gt.shape[2]}"
        )
    return lq, gt


def pad_to_at_least(image: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pads the bottom and right of an image smaller than ``size`` on either side."""
    pad_h = max(0, size - image.shape[0])
    pad_w = max(0, size - image.shape[1])
    if pad_h == 0 and pad_w == 0:
        return image
    mode = "reflect" if min(image.shape[:2]) > 1 else "edge"
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)


def random_patch(
    lq: np.ndarray, gt: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The same random ``size`` x ``size`` window of both images (padded first if too small)."""
    lq, gt = pad_to_at_least(lq, size), pad_to_at_least(gt, size)
    top = int(rng.integers(0, lq.shape[0] - size + 1))
    left = int(rng.integers(0, lq.shape[1] - size + 1))
    window = (slice(top, top + size), slice(left, left + size))
    return lq[window], gt[window]


def random_flip_rotate(
    images: tuple[np.ndarray, ...], rng: np.random.Generator, flips: bool, rotations: bool
) -> tuple[np.ndarray, ...]:
    """Applies one random element of the dihedral group (flips and 90-degree turns) to all images."""
    if flips and rng.uniform() < 0.5:
        images = tuple(im[:, ::-1] for im in images)
    if flips and rng.uniform() < 0.5:
        images = tuple(im[::-1] for im in images)
    if rotations:
        quarter_turns = int(rng.integers(0, 4))
        images = tuple(np.rot90(im, quarter_turns) for im in images)
    return images


class TrainPatches(Dataset):
    """Random patches of a pair source with flips and rotations, indexed by :class:`PatchKey`."""

    def __init__(self, source: PairSource, flips: bool = True, rotations: bool = True):
        self.source = source
        self.flips = flips
        self.rotations = rotations

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: PatchKey) -> dict:
        index, patch_size, seed = key
        rng = np.random.default_rng(seed)
        lq, gt = load_checked(self.source, index, rng)
        lq, gt = random_patch(lq, gt, patch_size, rng)
        lq, gt = random_flip_rotate((lq, gt), rng, self.flips, self.rotations)
        return {"lq": to_tensor(lq), "gt": to_tensor(gt), "name": self.source.name(index), "seed": seed}


class WholeImages(Dataset):
    """Whole pairs for validation and testing; item ``i`` is always the same pair."""

    def __init__(self, source: PairSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        lq, gt = load_checked(self.source, index, np.random.default_rng(index))
        return {"lq": to_tensor(lq), "gt": to_tensor(gt), "name": self.source.name(index), "index": index}
