"""The papers' evaluation protocols: for each table, what the official evaluation code computes.

A protocol fixes how a pair is read (the data config's ``read_8bit`` must agree), whether the
restored image is scored as the float output or as the file the official test script saved, which
PSNR, SSIM, MAE and LPIPS, and the groups of the table's rows. Each data config names its protocol
(``protocol:``); ``evaluate protocol=...`` overrides it.

=================  ==========================================================================
``dpdd_single``    Restormer ``Defocus_Deblurring/test_single_image_defocus_deblur.py`` and
                   ``utils.py``: images read with ``cv2.imread(path)`` (8 bits), the float output
                   scored (PSNR on float32, scikit-image's default SSIM, MAE, LPIPS), indoor /
                   outdoor / combined rows.
``dpdd_dual``      Restormer ``test_dual_pixel_defocus_deblur.py`` and Swintormer ``test.py``:
                   the same on the 16-bit images.
``gopro_matlab``   Restormer / HI-Diff ``evaluate_gopro_hide.m``: MATLAB's ``psnr`` and ``ssim``
                   on the uint8 images the test script saved (GoPro, HIDE).
``realblur``       HI-Diff / Restormer ``evaluate_realblur.py``: intensity matching, ECC alignment,
                   PSNR and Gaussian SSIM over the warp's valid pixels, on the saved 8-bit images.
``standard``       BasicSR-style validation (synthetic data, your folders): PSNR, Gaussian SSIM
                   per channel, MAE and LPIPS on the image saved at the input's bit depth.
=================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from deblur_diffusion.data.io import to_integer_image
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.metrics import (
    DPDD_TEST_SCENES,
    LPIPS,
    align_realblur,
    dpdd_group,
    dpdd_psnr,
    dpdd_ssim,
    mae,
    matlab_psnr,
    matlab_ssim,
    psnr,
    realblur_ssim,
    ssim,
)

Scorer = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


def _hwc(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) tensor -> H x W x 3 float32 array."""
    return image[0].permute(1, 2, 0).numpy().astype(np.float32, copy=False)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """An image already rounded to 8 bits, as the uint8 array the saved file holds; an image outside
    [0, 1] is refused (a file cannot hold it, and wrapping or clipping it would change the score)."""
    array = _hwc(image)
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"the MATLAB protocol scores the uint8 file of an image in [0, 1]; got values in [{low:g}, {high:g}]")
    return to_integer_image(array, 8)


def _score_standard(restored: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    return {"psnr": psnr(restored, target).item(), "ssim": ssim(restored, target).item(), "mae": mae(restored, target).item()}


def _score_dpdd(restored: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    out, gt = _hwc(restored), _hwc(target)
    # scikit-learn's mean_absolute_error per channel, then the mean of the three: with equal pixel
    # counts per channel that is the mean absolute error of all values.
    return {"psnr": dpdd_psnr(out, gt), "ssim": dpdd_ssim(out, gt), "mae": mae(restored, target).item()}


def _score_matlab(restored: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    out, gt = _to_uint8(restored), _to_uint8(target)
    return {"psnr": matlab_psnr(out, gt), "ssim": matlab_ssim(out, gt)}


def _score_realblur(restored: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    aligned, masked_target, mask = align_realblur(_hwc(restored), _hwc(target))
    ssim_value = realblur_ssim(aligned, masked_target, mask)
    aligned, masked_target, mask = (torch.from_numpy(a).permute(2, 0, 1)[None] for a in (aligned, masked_target, mask))
    return {"psnr": psnr(aligned, masked_target, mask).item(), "ssim": ssim_value}


def _single_group(index: int, size: int) -> str:
    return "all"


def _dpdd_groups(index: int, size: int) -> str:
    # The indoor/outdoor labels exist for the 76 test scenes only (not for DPDD's val split).
    return dpdd_group(index) if size == DPDD_TEST_SCENES else "all"


@dataclass(frozen=True)
class Protocol:
    """One table's evaluation.

    Attributes:
        name: the name used in configs.
        script: the official code whose numbers this reproduces.
        columns: metric key -> column heading that says which definition it is.
        read_8bit: what the data's ``read_8bit`` must be (None: either; the file's own depth).
        eight_bit_only: the official code reads 8-bit files only (its metrics assume 255 levels).
        scores_saved_file: the official code scores the restored image after writing it at the
            input's bit depth (rounded), not the float output.
        lpips: whether the official code reports LPIPS (AlexNet).
        groups: (index, number of images) -> the row an image belongs to (besides "combined").
        scorer: (restored, target) as (1, 3, H, W) float tensors in [0, 1] -> metric values.
    """

    name: str
    script: str
    columns: dict[str, str]
    read_8bit: bool | None
    eight_bit_only: bool
    scores_saved_file: bool
    lpips: bool
    groups: Callable[[int, int], str]
    scorer: Scorer

    def score(self, restored: torch.Tensor, target: torch.Tensor, lpips: LPIPS | None) -> dict[str, float]:
        row = self.scorer(restored, target)
        if self.lpips and lpips is not None:
            row["lpips"] = lpips(restored, target).item()
        return row


_DPDD_COLUMNS = {
    "psnr": "PSNR (dB, float32)",
    "ssim": "SSIM (skimage default: 7x7 uniform, sample cov.)",
    "mae": "MAE",
    "lpips": "LPIPS (AlexNet)",
}

PROTOCOLS: dict[str, Protocol] = {
    protocol.name: protocol
    for protocol in (
        Protocol(
            "dpdd_single",
            "Restormer Defocus_Deblurring/test_single_image_defocus_deblur.py + utils.py",
            _DPDD_COLUMNS,
            read_8bit=True,
            eight_bit_only=True,
            scores_saved_file=False,
            lpips=True,
            groups=_dpdd_groups,
            scorer=_score_dpdd,
        ),
        Protocol(
            "dpdd_dual",
            "Restormer Defocus_Deblurring/test_dual_pixel_defocus_deblur.py + utils.py; Swintormer basicsr/test.py",
            _DPDD_COLUMNS,
            read_8bit=False,
            eight_bit_only=False,
            scores_saved_file=False,
            lpips=True,
            groups=_dpdd_groups,
            scorer=_score_dpdd,
        ),
        Protocol(
            "gopro_matlab",
            "Restormer Motion_Deblurring/evaluate_gopro_hide.m (HI-Diff: the same script)",
            {"psnr": "PSNR (dB, MATLAB psnr, uint8)", "ssim": "SSIM (MATLAB ssim: 3-D Gaussian, sigma 1.5)"},
            read_8bit=None,
            eight_bit_only=True,
            scores_saved_file=True,
            lpips=False,
            groups=_single_group,
            scorer=_score_matlab,
        ),
        Protocol(
            "realblur",
            "HI-Diff evaluate_realblur.py (Restormer Motion_Deblurring/evaluate_realblur.py)",
            {"psnr": "PSNR (dB, aligned, masked)", "ssim": "SSIM (Gaussian sigma 1.5, aligned, masked)"},
            read_8bit=None,
            eight_bit_only=True,
            scores_saved_file=True,
            lpips=False,
            groups=_single_group,
            scorer=_score_realblur,
        ),
        Protocol(
            "standard",
            "BasicSR-style validation (this package's val/psnr and val/ssim)",
            {"psnr": "PSNR (dB)", "ssim": "SSIM (Gaussian sigma 1.5, per channel)", "mae": "MAE", "lpips": "LPIPS (AlexNet)"},
            read_8bit=None,
            eight_bit_only=False,
            scores_saved_file=True,
            lpips=True,
            groups=_single_group,
            scorer=_score_standard,
        ),
    )
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]
