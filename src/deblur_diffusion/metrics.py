"""Image-quality metrics, one function per definition that the papers' evaluation code uses.

:func:`psnr`, :func:`ssim` and :func:`mae` are computed per image in float64 on (B, C, H, W)
tensors in [0, 1]; they are training's validation metrics and the ``standard`` protocol's.
:func:`ssim` is Wang et al.'s with an 11-tap Gaussian window (sigma 1.5), population covariances
and the window's border cropped, per channel: scikit-image's ``structural_similarity(
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)`` in float64. It is
written out here because torchmetrics' SSIM pads and crops differently and disagrees with it by
about 3e-4, and because it runs on the GPU during validation.

The official evaluation scripts' own definitions, for :mod:`deblur_diffusion.protocols`:

* :func:`dpdd_psnr`, :func:`dpdd_ssim`: Restormer's ``Defocus_Deblurring/utils.py`` (float32 MSE;
  scikit-image's default SSIM, 7 x 7 uniform window with sample covariance);
* :func:`matlab_psnr`, :func:`matlab_ssim`: MATLAB's ``psnr`` and ``ssim`` on uint8 H x W x 3
  arrays, as ``evaluate_gopro_hide.m`` calls them: MATLAB treats such an array as a volume;
* :func:`align_realblur`, :func:`realblur_ssim` and the masked :func:`psnr`: RealBlur's
  ``evaluate_realblur.py`` (intensity matching, ECC alignment, metrics over the warp's valid pixels).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from deblur_diffusion.errors import DeblurError

SSIM_SIGMA = 1.5
# scikit-image's window for sigma 1.5: radius int(3.5 * sigma + 0.5) = 5.
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2

# DPDD test scenes shot indoors (0-based, sorted file order); the others are outdoor.
DPDD_INDOOR_INDICES = frozenset(
    [8, 9, 10, 11, 12, 13, 16, 32, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56,
     59, 60, 61, 62, 63, 64, 65, 66, 67, 74, 75]
)  # fmt: skip
DPDD_TEST_SCENES = 76

ECC_ITERATIONS = 100
ECC_GAUSSIAN_FILTER = 5
LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"


def _per_image_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.flatten(1).mean(dim=1)
    return (values * mask).flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1)


def psnr(restored: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB (data range 1); with ``mask``, the error is averaged over its pixels."""
    error = (restored.double() - target.double()) ** 2
    return 10 * torch.log10(1.0 / _per_image_mean(error, None if mask is None else mask.double()))


def mae(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute error."""
    return _per_image_mean((restored.double() - target.double()).abs(), None)


def _gaussian_profile(radius: int, sigma: float, device: torch.device) -> torch.Tensor:
    """A normalised 1-D Gaussian of ``2 * radius + 1`` taps (float64); a separable N-D window is the
    product of such profiles."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    profile = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return profile / profile.sum()


def ssim_map(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The SSIM of every window fully inside the image: (B, C, H - 10, W - 10)."""
    x, y = restored.double(), target.double()
    channels = x.shape[1]
    profile = _gaussian_profile(SSIM_RADIUS, SSIM_SIGMA, x.device)
    vertical = profile.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    horizontal = profile.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(image, vertical, groups=channels), horizontal, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    covariance = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * covariance + SSIM_C2)
    denominator = (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return numerator / denominator


def ssim(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window, per channel, averaged)."""
    if min(restored.shape[-2:]) <= 2 * SSIM_RADIUS:
        raise ValueError(f"SSIM needs images larger than {2 * SSIM_RADIUS + 1} px, got {tuple(restored.shape[-2:])}")
    return ssim_map(restored, target).flatten(1).mean(dim=1)


# MATLAB's ssim (Image Processing Toolbox, R2014a and later): a Gaussian weighting window of
# sigma 1.5 and size 2 * ceil(3 * sigma) + 1 in every dimension of the input, so 11 x 11 x 11 for
# an H x W x 3 array; 'replicate' padding, so the map has the image's size; C1 = (0.01 L)^2 and
# C2 = (0.03 L)^2 with L the dynamic range of the class (255 for uint8); the result is the map's mean.
MATLAB_SSIM_SIGMA = 1.5
MATLAB_SSIM_RADIUS = math.ceil(3 * MATLAB_SSIM_SIGMA)
UINT8_RANGE = 255.0


def _replicate_blur_3d(volume: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
    """Gaussian filter of a (1, 1, D, H, W) volume with replicated borders on all three axes."""
    r = MATLAB_SSIM_RADIUS
    padded = F.pad(volume, (r, r, r, r, r, r), mode="replicate")
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = -1
        padded = F.conv3d(padded, profile.view(shape))
    return padded


def matlab_ssim(restored: np.ndarray, target: np.ndarray) -> float:
    """MATLAB's ``ssim(restored, target)`` on two uint8 H x W x 3 arrays (one volume, 3-D window)."""
    if restored.dtype != np.uint8 or target.dtype != np.uint8:
        raise TypeError(f"matlab_ssim scores uint8 images, got {restored.dtype} and {target.dtype}")
    x = torch.from_numpy(restored.transpose(2, 0, 1).astype(np.float64))[None, None]
    y = torch.from_numpy(target.transpose(2, 0, 1).astype(np.float64))[None, None]
    # The 11 x 11 x 11 kernel normalised as a whole is the product of three normalised profiles.
    profile = _gaussian_profile(MATLAB_SSIM_RADIUS, MATLAB_SSIM_SIGMA, x.device)
    mu_x, mu_y = _replicate_blur_3d(x, profile), _replicate_blur_3d(y, profile)
    var_x = _replicate_blur_3d(x * x, profile) - mu_x**2
    var_y = _replicate_blur_3d(y * y, profile) - mu_y**2
    covariance = _replicate_blur_3d(x * y, profile) - mu_x * mu_y
    c1, c2 = (0.01 * UINT8_RANGE) ** 2, (0.03 * UINT8_RANGE) ** 2
    ssim_values = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_values.mean().item()


def matlab_psnr(restored: np.ndarray, target: np.ndarray) -> float:
    """MATLAB's ``psnr(restored, target)`` on two uint8 arrays: peak 255, squared error in double."""
    error = np.mean((restored.astype(np.float64) - target.astype(np.float64)) ** 2)
    return float(10 * np.log10(UINT8_RANGE**2 / error))


def dpdd_psnr(restored: np.ndarray, target: np.ndarray) -> float:
    """PSNR as Restormer's ``Defocus_Deblurring/utils.py`` computes it: the mean squared error of
    the float32 arrays in float32 (NumPy's mean), 100 for identical images."""
    error = np.mean((target.astype(np.float32) - restored.astype(np.float32)) ** 2)
    return 100.0 if error == 0 else 10 * math.log10(1 / float(error))


def dpdd_ssim(restored: np.ndarray, target: np.ndarray) -> float:
    """SSIM as Restormer's ``Defocus_Deblurring/utils.py`` calls it: scikit-image's
    ``structural_similarity(target, restored, data_range=1)`` over the channel axis with its
    defaults (7 x 7 uniform window, sample covariance, border cropped, channels averaged), on the
    float32 arrays (scikit-image then computes in float32)."""
    return float(structural_similarity(target.astype(np.float32), restored.astype(np.float32), data_range=1, channel_axis=2))


def realblur_ssim(aligned: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """SSIM as RealBlur's ``evaluate_realblur.py`` computes it on the aligned, masked float32 images:
    scikit-image's Gaussian SSIM map (sigma 1.5, population covariance, data range 1; computed in
    float32 for float32 input, which moves the figure by up to 3e-5 from a float64 computation),
    multiplied by the mask, border windows cropped, a masked mean per channel, then the mean."""
    _, ssim_values = structural_similarity(
        target, aligned, channel_axis=2, gaussian_weights=True, use_sample_covariance=False, data_range=1.0, full=True
    )
    r = SSIM_RADIUS
    inner_mask = mask[r:-r, r:-r]
    per_channel = (ssim_values * mask)[r:-r, r:-r].sum(axis=(0, 1)) / inner_mask.sum(axis=(0, 1))
    return float(per_channel.mean())


def align_realblur(restored: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RealBlur's alignment of a restored H x W x 3 float image to its target.

    Scales the restored image by ``sum(target * restored) / sum(restored**2)``, finds the homography
    between the gray images with ECC (100 iterations, Gaussian filter 5), warps with cubic
    interpolation and reflected borders, and returns (aligned restored, target, valid mask), the
    first two multiplied by the mask.
    """
    restored = np.ascontiguousarray(restored, dtype=np.float32)
    target = np.ascontiguousarray(target, dtype=np.float32)
    scaled = (np.sum(target * restored) / max(np.sum(restored * restored), 1e-12)) * restored
    warp = np.eye(3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ECC_ITERATIONS, 0)
    try:
        _, warp = cv2.findTransformECC(
            cv2.cvtColor(target, cv2.COLOR_RGB2GRAY),
            cv2.cvtColor(scaled, cv2.COLOR_RGB2GRAY),
            warp,
            cv2.MOTION_HOMOGRAPHY,
            criteria,
            None,
            ECC_GAUSSIAN_FILTER,
        )
    except cv2.error as error:
        raise DeblurError(f"RealBlur alignment (ECC) did not converge: {error}") from error
    size = (target.shape[1], target.shape[0])
    aligned = cv2.warpPerspective(scaled, warp, size, flags=cv2.INTER_CUBIC + cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT)
    mask = cv2.warpPerspective(
        np.ones_like(scaled), warp, size, flags=cv2.INTER_NEAREST + cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    return aligned * mask, target * mask, mask


class LPIPSUnavailableError(DeblurError):
    """LPIPS cannot run (its AlexNet weights are neither cached nor downloadable)."""


class LPIPS:
    """LPIPS (AlexNet) from the ``lpips`` package, on [0, 1] images; loaded on first use.

    Called as the official DPDD tests call it, ``LPIPS(net='alex')(target, restored, normalize=True)``
    on the clamped float output.

    The package ships its linear layers but takes the AlexNet backbone from torchvision, which
    downloads it once into its cache (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``).
    Where it is not cached and cannot be downloaded (no network), using the metric raises
    :class:`LPIPSUnavailableError` saying why and where to put the file.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._model = None

    def _load(self):
        import lpips

        backbone = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILE
        try:
            return lpips.LPIPS(net="alex", verbose=False).to(self.device).eval()
        except (OSError, RuntimeError) as error:  # urllib's errors are OSErrors; a cut download fails torch's check
            reason = getattr(error, "reason", None) or error
            raise LPIPSUnavailableError(
                f"torchvision's AlexNet weights are not at {backbone} and could not be downloaded ({reason}); "
                f"put {LPIPS_BACKBONE_FILE} there or set TORCH_HOME"
            ) from error

    @torch.no_grad()
    def __call__(self, restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._model is None:
            self._model = self._load()
        distance = self._model(target.float().to(self.device), restored.float().to(self.device), normalize=True)
        return distance.flatten().double().cpu()


def dpdd_group(index: int) -> str:
    """``"indoor"`` or ``"outdoor"`` for the DPDD test image at ``index`` (sorted order)."""
    return "indoor" if index in DPDD_INDOOR_INDICES else "outdoor"
