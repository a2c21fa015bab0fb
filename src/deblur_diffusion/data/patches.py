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

from deblur_diffusion.data.sources import PairPlanes, PairSource
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
    _check_layout(source, index, [lq.shape], gt.shape)
    return lq, gt


def load_planes_checked(source: PairSource, index: int, rng: np.random.Generator) -> PairPlanes:
    """Loads a pair as stored (for training crops) and checks its layout."""
    planes = source.load_planes(index, rng)
    _check_layout(source, index, [plane.shape for plane in planes.inputs], planes.target.shape)
    return planes


def _check_layout(source: PairSource, index: int, input_shapes: list[tuple], gt_shape: tuple) -> None:
    """Every input plane the target's size; the input channels and three target channels as promised."""
    for shape in input_shapes:
        if shape[:2] != gt_shape[:2]:
            raise PairMismatchError(f"pair {source.name(index)!r}: input is {shape[0]}x{shape[1]}, target {gt_shape[0]}x{gt_shape[1]}")
    channels = sum(shape[2] for shape in input_shapes)
    if channels != source.in_channels or gt_shape[2] != 3:
        raise PairMismatchError(
            f"pair {source.name(index)!r}: expected {source.in_channels} input and 3 target channels, got {channels} and {gt_shape[2]}"
        )


def pad_to_at_least(image: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pads the bottom and right of an image smaller than ``size`` on either side."""
    pad_h = max(0, size - image.shape[0])
    pad_w = max(0, size - image.shape[1])
    if pad_h == 0 and pad_w == 0:
        return image
    mode = "reflect" if min(image.shape[:2]) > 1 else "edge"
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)


def random_patch(planes: PairPlanes, size: int, rng: np.random.Generator) -> PairPlanes:
    """The same random ``size`` x ``size`` window of every plane (padded first if too small); views,
    not copies."""
    height, width = planes.target.shape[:2]
    top = int(rng.integers(0, max(height, size) - size + 1))
    left = int(rng.integers(0, max(width, size) - size + 1))
    return planes.map(lambda plane: pad_to_at_least(plane[top : top + size, left : left + size], size))


def random_flip_rotate(planes: PairPlanes, rng: np.random.Generator, flips: bool, rotations: bool) -> PairPlanes:
    """Applies one random element of the dihedral group (flips and 90-degree turns) to all planes."""
    if flips and rng.uniform() < 0.5:
        planes = planes.map(lambda plane: plane[:, ::-1])
    if flips and rng.uniform() < 0.5:
        planes = planes.map(lambda plane: plane[::-1])
    if rotations:
        quarter_turns = int(rng.integers(0, 4))
        planes = planes.map(lambda plane: np.rot90(plane, quarter_turns))
    return planes


class TrainPatches(Dataset):
    """Random patches of a pair source with flips and rotations, indexed by :class:`PatchKey`.

    The patch is cut from the planes as stored and only then converted to float, so the cost of a
    sample is decoding (for image files) plus work on the patch alone.
    """

    def __init__(self, source: PairSource, flips: bool = True, rotations: bool = True):
        self.source = source
        self.flips = flips
        self.rotations = rotations

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: PatchKey) -> dict:
        index, patch_size, seed = key
        rng = np.random.default_rng(seed)
        planes = load_planes_checked(self.source, index, rng)
        planes = random_patch(planes, patch_size, rng)
        lq, gt = random_flip_rotate(planes, rng, self.flips, self.rotations).to_float()
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
