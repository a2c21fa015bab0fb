"""Image-quality metrics and the papers' evaluation protocols.

PSNR, SSIM and MAE are computed per image in float64 on (B, C, H, W) tensors in [0, 1].
SSIM is Wang et al.'s with an 11-tap Gaussian window (sigma 1.5), population covariances and the
window's border cropped, i.e. scikit-image's ``structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1)`` and MATLAB's ``ssim``. It is written out
here because torchmetrics' SSIM pads and crops differently and disagrees with it by about 3e-4.
A valid convolution gives exactly the values scikit-image keeps after cropping its border.

RealBlur (Rim et al.) first matches the restored image's intensity to the target, aligns it with
ECC (homography) and scores only the pixels the warp covers: :func:`align_realblur`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

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


def _gaussian_window(device: torch.device) -> torch.Tensor:
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    profile = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return profile / profile.sum()


def ssim_map(restored: torch.Tensor, target: torch.Tensor, sample_covariance: bool = False) -> torch.Tensor:
    """The SSIM of every window fully inside the image: (B, C, H - 10, W - 10).

    ``sample_covariance=True`` rescales the (co)variances by N / (N - 1), N = 121 window pixels,
    as scikit-image does by default; the papers' SSIM (Wang et al., MATLAB) does not."""
    x, y = restored.double(), target.double()
    channels = x.shape[1]
    profile = _gaussian_window(x.device)
    vertical = profile.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    horizontal = profile.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(image, vertical, groups=channels), horizontal, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    covariance = blur(x * y) - mu_x * mu_y
    if sample_covariance:
        pixels = (2 * SSIM_RADIUS + 1) ** 2
        var_x, var_y, covariance = (v * pixels / (pixels - 1) for v in (var_x, var_y, covariance))
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * covariance + SSIM_C2)
    denominator = (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return numerator / denominator


def ssim(
    restored: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, sample_covariance: bool = False
) -> torch.Tensor:
    """Per-image SSIM; with ``mask`` (B, C, H, W), a masked mean per channel, then over channels
    (the RealBlur protocol)."""
    if min(restored.shape[-2:]) <= 2 * SSIM_RADIUS:
        raise ValueError(f"SSIM needs images larger than {2 * SSIM_RADIUS + 1} px, got {tuple(restored.shape[-2:])}")
    values = ssim_map(restored, target, sample_covariance)
    if mask is None:
        return values.flatten(1).mean(dim=1)
    r = SSIM_RADIUS
    inner = mask.double()[..., r:-r, r:-r]
    per_channel = (values * inner).sum(dim=(2, 3)) / inner.sum(dim=(2, 3))
    return per_channel.mean(dim=1)


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


class LPIPSUnavailable(DeblurError):
    """LPIPS cannot run (its AlexNet weights are not available offline)."""


class LPIPS:
    """LPIPS (AlexNet) from the ``lpips`` package, on [0, 1] images; loaded on first use.

    The package ships its linear layers but takes the AlexNet backbone from torchvision's cache
    (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``); without it and offline, using the
    metric raises :class:`LPIPSUnavailable` with that path.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._model = None

    def _load(self):
        backbone = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILE
        if not backbone.is_file():
            raise LPIPSUnavailable(
                f"LPIPS needs torchvision's AlexNet weights at {backbone} (no network here to download them); "
                f"put {LPIPS_BACKBONE_FILE} there or set TORCH_HOME"
            )
        import lpips

        return lpips.LPIPS(net="alex", verbose=False).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._model is None:
            self._model = self._load()
        distance = self._model(restored.float().to(self.device) * 2 - 1, target.float().to(self.device) * 2 - 1)
        return distance.flatten().double().cpu()


def dpdd_group(index: int) -> str:
    """``"indoor"`` or ``"outdoor"`` for the DPDD test image at ``index`` (sorted order)."""
    return "indoor" if index in DPDD_INDOOR_INDICES else "outdoor"
