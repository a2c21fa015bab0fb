import numpy as np
import pytest

from deblur_diffusion.data.kernels import (
    KERNEL_KINDS,
    blur_image,
    camera_shake_trajectory,
    defocus_kernel,
    gaussian_kernel,
    motion_kernel,
    random_kernel,
)


def centroid(kernel):
    yy, xx = np.mgrid[: kernel.shape[0], : kernel.shape[1]]
    return (kernel * yy).sum(), (kernel * xx).sum()


@pytest.mark.parametrize("size", [1, 5, 15, 31])
@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_random_kernels_are_normalised_non_negative_and_of_requested_size(kind, size, rng):
    for _ in range(5):
        drawn_kind, kernel = random_kernel(rng, size, kinds=[kind])
        assert drawn_kind == kind
        assert kernel.shape == (size, size)
        assert kernel.dtype == np.float32
        assert kernel.min() >= 0
        assert kernel.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("size", [0, 4, -3])
def test_even_or_non_positive_sizes_are_rejected(size):
    with pytest.raises(ValueError, match="odd"):
        defocus_kernel(2.0, size)


def test_defocus_disc_has_the_area_of_its_radius():
    radius = 6.3
    kernel = defocus_kernel(radius, 17)
    # The anti-aliased disc covers pi r^2 pixels, so its uniform value is 1 / (pi r^2).
    assert kernel[8, 8] == pytest.approx(1 / (np.pi * radius**2), rel=1e-2)
    assert kernel[0, 0] == 0
    assert centroid(kernel) == pytest.approx((8, 8), abs=1e-6)
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-7)
    np.testing.assert_allclose(kernel, kernel[::-1], atol=1e-7)


def test_gaussian_kernel_matches_formula():
    kernel = gaussian_kernel(2.0, size=9)
    yy, xx = np.mgrid[-4:5, -4:5]
    expected = np.exp(-(xx**2 + yy**2) / 8.0)
    np.testing.assert_allclose(kernel, expected / expected.sum(), rtol=1e-5)


def test_anisotropic_gaussian_is_elongated_along_its_angle():
    kernel = gaussian_kernel(3.0, 0.7, angle=0.0, size=15)
    assert kernel[7, 7 + 4] > 10 * kernel[7 + 4, 7]


def test_camera_shake_trajectory_has_the_requested_length_and_is_centred(rng):
    path = camera_shake_trajectory(rng, length=12.0)
    assert np.sum(np.linalg.norm(np.diff(path, axis=0), axis=1)) == pytest.approx(12.0)
    np.testing.assert_allclose(path.mean(axis=0), 0.0, atol=1e-9)


def test_straight_motion_kernel_is_a_centred_line():
    path = np.stack([np.linspace(-3, 3, 61), np.zeros(61)], axis=1)
    kernel = motion_kernel(path, 9)
    assert np.count_nonzero(kernel[4]) == 7
    assert kernel.sum() - kernel[4].sum() == pytest.approx(0, abs=1e-7)
    assert centroid(kernel) == pytest.approx((4, 4), abs=1e-6)


def test_blur_keeps_constant_images_and_moves_no_mass(rng):
    constant = np.full((20, 24, 3), 0.4, dtype=np.float32)
    _, kernel = random_kernel(rng, 9)
    np.testing.assert_allclose(blur_image(constant, kernel), constant, atol=1e-6)
    impulse = np.zeros((21, 21, 1), dtype=np.float32)
    impulse[10, 10] = 1.0
    asymmetric = np.zeros((5, 5), dtype=np.float32)
    asymmetric[2, 3] = 1.0
    # A kernel with all mass one pixel right of its centre shifts the image one pixel right.
    shifted = blur_image(impulse, asymmetric)
    assert shifted[10, 11, 0] == pytest.approx(1.0)
