"""The embedded synthetic dataset: everything runs out of the box, with no download.

Sharp images are the natural photographs that scikit-image ships inside its wheel and
procedurally generated dead-leaves images (random occluding discs with power-law radii, whose
statistics resemble natural images). They are blurred on the fly by defocus, camera-shake or
Gaussian kernels, with optional Gaussian noise.

The split is by source image: the photographs in ``VALIDATION_PHOTOS`` and the dead-leaves seeds of
the validation stream never appear in training. A validation pair is a pure function of
``(seed, index)``, so its blur, and the validation PSNR, are reproducible.

With ``photo_dir`` the sharp images are the user's own photographs instead (``data=sharp_folder``):
a user with no blurry/sharp pairs trains and validates on them with the same kernels, noise,
seeding and reproducible validation; ``validation_fraction`` of the files (drawn with ``seed``) are
held out for validation and never cropped for training.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from deblur_diffusion.data.io import list_images, read_image, to_float
from deblur_diffusion.data.kernels import KERNEL_KINDS, blur_image, random_kernel
from deblur_diffusion.data.sources import PairSource
from deblur_diffusion.errors import DatasetLayoutError

TRAIN_PHOTOS = (
    "astronaut",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "brick",
    "grass",
    "gravel",
    "moon",
    "clock",
)
VALIDATION_PHOTOS = ("chelsea", "coins")
DEAD_LEAVES = "dead_leaves"

_SPLITS = ("train", "val")
_VAL_STREAM = 1


@cache
def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as float32 RGB in [0, 1]."""
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return to_float(image[:, :, :3])


def dead_leaves(size: int, rng: np.random.Generator, min_radius: float = 2.0, max_radius: float | None = None) -> np.ndarray:
    """A dead-leaves image: discs of random colour with density of radii proportional to r^-3."""
    max_radius = max_radius or size / 4
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
    count = int(8 * size * size / (np.pi * min_radius * max_radius))
    uniform = rng.uniform(size=count)
    radii = (min_radius**-2 - uniform * (min_radius**-2 - max_radius**-2)) ** -0.5
    centres = rng.uniform(-max_radius / 2, size + max_radius / 2, size=(count, 2))
    colours = rng.integers(0, 256, size=(count, 3))
    for (x, y), radius, colour in zip(centres, radii, colours, strict=True):
        cv2.circle(canvas, (int(x), int(y)), max(round(radius), 1), colour.tolist(), -1, cv2.LINE_AA)
    return to_float(canvas)


def random_crop_rescaled(photo: np.ndarray, size: int, rng: np.random.Generator, min_scale: float) -> np.ndarray:
    """A ``size`` x ``size`` crop of the photo after a random downscale in [min_scale, 1]."""
    height, width = photo.shape[:2]
    fit = size / min(height, width)
    scale = max(rng.uniform(min_scale, 1.0), fit)
    if scale != 1.0:
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        photo = cv2.resize(photo, new_size, interpolation=cv2.INTER_AREA)
    top = rng.integers(0, photo.shape[0] - size + 1)
    left = rng.integers(0, photo.shape[1] - size + 1)
    return photo[top : top + size, left : left + size]


class SyntheticPairs(PairSource):
    """Synthetic blur pairs generated on the fly.

    Args:
        split: ``"train"`` (random pairs; ``length`` sets how many make an epoch) or ``"val"``
            (``length`` fixed pairs, identical at every call).
        image_size: side of the square sharp images.
        kernel_size: side of the blur kernels (odd).
        kernel_kinds: subset of ``("defocus", "motion", "gaussian")``.
        noise_sigma_max: Gaussian noise with a sigma drawn uniformly in [0, this], added after blur.
        dead_leaves_fraction: share of pairs built from dead-leaves images instead of photographs.
        min_scale: photographs are downscaled by a random factor in [min_scale, 1] before cropping.
        seed: seeds the validation pairs (and which of ``photo_dir``'s files are held out).
        photo_dir: a folder of the user's sharp photographs, used instead of scikit-image's.
        validation_fraction: with ``photo_dir``, the share of its files held out for the ``val``
            split (at least one, and at least one left for ``train``).
    """

    def __init__(
        self,
        split: str = "train",
        length: int = 256,
        image_size: int = 128,
        kernel_size: int = 15,
        kernel_kinds: Sequence[str] = KERNEL_KINDS,
        noise_sigma_max: float = 0.0,
        dead_leaves_fraction: float = 0.3,
        min_scale: float = 0.4,
        seed: int = 0,
        photo_dir: str | Path | None = None,
        validation_fraction: float = 0.1,
    ):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.split = split
        self.length = length
        self.image_size = image_size
        self.kernel_size = kernel_size
        self.kernel_kinds = tuple(kernel_kinds)
        self.noise_sigma_max = noise_sigma_max
        self.dead_leaves_fraction = dead_leaves_fraction
        self.min_scale = min_scale
        self.seed = seed
        self.photo_dir = photo_dir
        if photo_dir is None:
            self.photos = TRAIN_PHOTOS if split == "train" else VALIDATION_PHOTOS
        else:
            self.photos = tuple(str(path) for path in own_photos(Path(photo_dir), split, validation_fraction, seed))

    def __len__(self) -> int:
        return self.length

    def _validation_source(self, index: int) -> str:
        sources = (*self.photos, DEAD_LEAVES) if self.dead_leaves_fraction > 0 else self.photos
        return sources[index % len(sources)]

    def _source_of(self, index: int, rng: np.random.Generator) -> str:
        if self.split == "val":
            return self._validation_source(index)
        if rng.uniform() < self.dead_leaves_fraction:
            return DEAD_LEAVES
        return self.photos[rng.integers(len(self.photos))]

    def name(self, index: int) -> str:
        if self.split == "val":
            return f"{index:04d}_{Path(self._validation_source(index)).stem}"
        return f"{self.split}_{index:06d}"

    def _validation_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _VAL_STREAM, index])

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.split == "val":
            rng = self._validation_rng(index)
        margin = self.kernel_size
        padded_size = self.image_size + 2 * margin
        source = self._source_of(index, rng)
        if source == DEAD_LEAVES:
            sharp = dead_leaves(padded_size, rng)
        else:
            photo = load_photo(source) if self.photo_dir is None else read_image(source)
            sharp = random_crop_rescaled(photo, padded_size, rng, self.min_scale)
        _, kernel = random_kernel(rng, self.kernel_size, self.kernel_kinds)
        blurry = blur_image(sharp, kernel)
        inner = (slice(margin, margin + self.image_size), slice(margin, margin + self.image_size))
        sharp, blurry = sharp[inner], blurry[inner]
        if self.noise_sigma_max > 0:
            sigma = rng.uniform(0.0, self.noise_sigma_max)
            blurry = blurry + rng.normal(0.0, sigma, size=blurry.shape).astype(np.float32)
        return np.clip(blurry, 0.0, 1.0).astype(np.float32), np.ascontiguousarray(sharp, dtype=np.float32)

    def describe(self) -> str:
        photos = f"{len(self.photos)} photographs" + (f" of {self.photo_dir}" if self.photo_dir is not None else "")
        return (
            f"synthetic {self.split}: {len(self)} pairs of {self.image_size}px from {photos} "
            f"and dead leaves, kernels {list(self.kernel_kinds)} of size {self.kernel_size}"
        )


def own_photos(folder: Path, split: str, validation_fraction: float, seed: int) -> list[Path]:
    """The files of ``folder`` a split blurs: ``validation_fraction`` of them (drawn with ``seed``)
    for ``val``, the others for ``train``."""
    if not folder.is_dir():
        raise DatasetLayoutError(f"photo_dir {folder} is not a folder of sharp images")
    files = list_images(folder)
    if len(files) < 2:
        raise DatasetLayoutError(f"photo_dir {folder} holds {len(files)} images; at least 2 are needed (one is held out for validation)")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    held = min(len(files) - 1, max(1, round(validation_fraction * len(files))))
    chosen = set(np.random.default_rng(seed).permutation(len(files))[:held].tolist())
    return [path for index, path in enumerate(files) if (index in chosen) == (split == "val")]
