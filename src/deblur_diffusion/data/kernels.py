"""Blur kernels for synthetic data: defocus, camera-shake motion and Gaussian.

Every kernel is a float32 square array of the requested odd size that sums to one, centred so
that blurring does not shift the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

KERNEL_KINDS = ("defocus", "motion", "gaussian")

_DISC_SUPERSAMPLING = 16
MIN_STRENGTH = 0.3
_TRAJECTORY_STEPS = 512


def _check_size(size: int) -> None:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd number, got {size}")


def _normalised(kernel: np.ndarray) -> np.ndarray:
    total = kernel.sum()
    if total <= 0:
        raise ValueError("kernel has no positive mass")
    return (kernel / total).astype(np.float32)


def defocus_kernel(radius: float, size: int) -> np.ndarray:
    """Out-of-focus blur: a uniform disc, anti-aliased by the fraction of each pixel it covers."""
    _check_size(size)
    if radius <= 0:
        raise ValueError(f"defocus radius must be positive, got {radius}")
    steps = (np.arange(size * _DISC_SUPERSAMPLING) + 0.5) / _DISC_SUPERSAMPLING - size / 2
    yy, xx = np.meshgrid(steps, steps, indexing="ij")
    inside = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    coverage = inside.reshape(size, _DISC_SUPERSAMPLING, size, _DISC_SUPERSAMPLING).mean(axis=(1, 3))
    if coverage.sum() == 0:
        coverage[size // 2, size // 2] = 1.0
    return _normalised(coverage)


def gaussian_kernel(sigma_x: float, sigma_y: float | None = None, angle: float = 0.0, size: int = 15) -> np.ndarray:
    """Anisotropic Gaussian rotated by ``angle`` radians (isotropic when ``sigma_y`` is None)."""
    _check_size(size)
    sigma_y = sigma_x if sigma_y is None else sigma_y
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"Gaussian sigmas must be positive, got {sigma_x}, {sigma_y}")
    half = size // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    cos, sin = np.cos(angle), np.sin(angle)
    u = cos * xx + sin * yy
    v = -sin * xx + cos * yy
    return _normalised(np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2)))


def camera_shake_trajectory(rng: np.random.Generator, length: float, anxiety: float | None = None) -> np.ndarray:
    """A random 2-D camera path of the given arc length, centred on its mean (N x 2, in pixels).

    The camera moves with inertia: each step keeps most of the previous velocity, receives a
    Gaussian perturbation, is pulled back towards the start (hands return to where they aim), and
    with small probability gets an abrupt jerk. ``anxiety`` scales the perturbations.
    """
    anxiety = rng.uniform(0.0, 1.0) if anxiety is None else anxiety
    centripetal = 0.7 * rng.uniform(0.0, 1.0)
    jerk_probability = 0.2 * rng.uniform(0.0, 1.0)
    velocity = rng.normal(size=2)
    velocity /= np.linalg.norm(velocity) + 1e-12
    position = np.zeros(2)
    points = np.empty((_TRAJECTORY_STEPS, 2))
    for step in range(_TRAJECTORY_STEPS):
        if rng.uniform() < jerk_probability:
            velocity = velocity - 2 * rng.normal(size=2) * (1 + anxiety)
        velocity = velocity + anxiety * rng.normal(size=2) - centripetal * position / _TRAJECTORY_STEPS
        velocity /= np.linalg.norm(velocity) + 1e-12
        position = position + velocity
        points[step] = position
    arc = np.sum(np.linalg.norm(np.diff(points, axis=0), axis=1))
    points *= length / max(arc, 1e-12)
    return points - points.mean(axis=0)


def motion_kernel(trajectory: np.ndarray, size: int) -> np.ndarray:
    """Rasterises a trajectory (N x 2, pixels, centred) into a kernel by bilinear splatting.

    Parts of the path that fall outside the kernel are clipped to its border.
    """
    _check_size(size)
    centre = size // 2
    coords = np.clip(trajectory + centre, 0, size - 1 - 1e-6)
    kernel = np.zeros((size, size), dtype=np.float64)
    x0 = np.floor(coords[:, 0]).astype(int)
    y0 = np.floor(coords[:, 1]).astype(int)
    fx = coords[:, 0] - x0
    fy = coords[:, 1] - y0
    x1 = np.minimum(x0 + 1, size - 1)
    y1 = np.minimum(y0 + 1, size - 1)
    np.add.at(kernel, (y0, x0), (1 - fx) * (1 - fy))
    np.add.at(kernel, (y0, x1), fx * (1 - fy))
    np.add.at(kernel, (y1, x0), (1 - fx) * fy)
    np.add.at(kernel, (y1, x1), fx * fy)
    return _normalised(kernel)


def random_kernel(
    rng: np.random.Generator,
    size: int = 21,
    kinds: Sequence[str] = KERNEL_KINDS,
    max_defocus_radius: float | None = None,
    max_motion_length: float | None = None,
    max_gaussian_sigma: float | None = None,
) -> tuple[str, np.ndarray]:
    """Draws a kernel kind from ``kinds`` and then its parameters; returns (kind, kernel).

    The maxima default to what fits in the kernel (radius size/2, path length 1.5*size,
    sigma size/6); parameters are drawn between ``MIN_STRENGTH`` times the maximum and the maximum,
    so that every pair is visibly blurred.
    """
    unknown = set(kinds) - set(KERNEL_KINDS)
    if unknown or not kinds:
        raise ValueError(f"kernel kinds must be a non-empty subset of {KERNEL_KINDS}, got {list(kinds)}")
    kind = str(rng.choice(list(kinds)))
    if kind == "defocus":
        radius_max = max_defocus_radius or size / 2
        return kind, defocus_kernel(rng.uniform(MIN_STRENGTH * radius_max, radius_max), size)
    if kind == "motion":
        length_max = max_motion_length or 1.5 * size
        trajectory = camera_shake_trajectory(rng, rng.uniform(MIN_STRENGTH * length_max, length_max))
        return kind, motion_kernel(trajectory, size)
    sigma_max = max_gaussian_sigma or size / 6
    sigmas = rng.uniform(MIN_STRENGTH * sigma_max, sigma_max, size=2)
    return kind, gaussian_kernel(sigmas[0], sigmas[1], rng.uniform(0, np.pi), size)


def blur_image(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolves an H x W x C float image with a kernel, reflecting the borders."""
    flipped = np.ascontiguousarray(kernel[::-1, ::-1])
    blurred = cv2.filter2D(image, -1, flipped, borderType=cv2.BORDER_REFLECT_101)
    return blurred.reshape(image.shape)
