"""How far each evaluation protocol is from the official scripts' computation, and how far the
previous single definition (Gaussian SSIM, 16-bit reading everywhere) was, on test-like pairs.

    python benchmarks/protocol_fidelity.py [--pairs 76] [--size 256]

Pairs are crops of scikit-image's colour photographs (16-bit with detail in the low byte for DPDD,
8-bit otherwise), blurred, and a "restored" image made by unsharp masking the blurry one. The
references are those of ``tests/test_protocols.py`` (scikit-image, OpenCV and SciPy called with the
official scripts' arguments).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_protocols import dpdd_reference, matlab_ssim_reference, realblur_reference

from deblur_diffusion.data.io import read_image
from deblur_diffusion.metrics import psnr, ssim
from deblur_diffusion.protocols import PROTOCOLS

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel", "retina")


def test_like_pairs(count: int, size: int, rng: np.random.Generator):
    photos = [getattr(skdata, name)() for name in PHOTOS]
    photos = [p for p in photos if p.ndim == 3 and min(p.shape[:2]) >= size]
    for index in range(count):
        photo = photos[index % len(photos)][..., :3]
        top = int(rng.integers(0, photo.shape[0] - size + 1))
        left = int(rng.integers(0, photo.shape[1] - size + 1))
        sharp = np.ascontiguousarray(photo[top : top + size, left : left + size])
        blurry = cv2.GaussianBlur(sharp, (9, 9), 2.0)
        restored = np.clip(blurry.astype(np.float32) + 0.7 * (blurry.astype(np.float32) - cv2.GaussianBlur(blurry, (0, 0), 1.5)), 0, 255)
        yield sharp, blurry, restored / 255.0


def to_16bit(image, rng):
    return image.astype(np.uint16) * 256 + rng.integers(0, 256, image.shape, dtype=np.uint16)


def nchw(image):
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]


def report(name, differences):
    differences = np.abs(np.asarray(differences))
    return f"{name:58s} mean {differences.mean():.2e}  max {differences.max():.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=76)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for sharp, _blurry, restored in test_like_pairs(args.pairs, args.size, rng):
            target_file, saved_file = folder / "target.png", folder / "saved.png"
            cv2.imwrite(str(target_file), to_16bit(sharp, rng)[:, :, ::-1])
            # DPDD: the official tests score the float output against the target as they read it.
            for protocol, flag, scale in (("dpdd_dual", -1, 65535.0), ("dpdd_single", cv2.IMREAD_COLOR, 255.0)):
                official_target = np.float32(cv2.imread(str(target_file), flag)[:, :, ::-1]) / scale
                ours = PROTOCOLS[protocol].score(nchw(restored), nchw(read_image(target_file, protocol == "dpdd_single")), None)
                ref_psnr, ref_ssim, _ = dpdd_reference(official_target, restored.astype(np.float32))
                rows.setdefault(f"{protocol}: PSNR (dB), package vs official", []).append(ours["psnr"] - ref_psnr)
                rows.setdefault(f"{protocol}: SSIM, package vs official", []).append(ours["ssim"] - ref_ssim)
            sixteen = nchw(read_image(target_file))
            official_dual_ssim = dpdd_reference(
                np.float32(cv2.imread(str(target_file), -1)[:, :, ::-1]) / 65535.0, restored.astype(np.float32)
            )[1]
            rows.setdefault("dpdd_dual: SSIM, previous Gaussian SSIM vs official", []).append(
                ssim(nchw(restored), sixteen).item() - official_dual_ssim
            )
            eight = np.float32(cv2.imread(str(target_file))[:, :, ::-1]) / 255.0
            single_psnr, single_ssim, _ = dpdd_reference(eight, restored.astype(np.float32))
            rows.setdefault("dpdd_single: PSNR (dB), previous 16-bit reading vs official", []).append(
                psnr(nchw(restored), sixteen).item() - single_psnr
            )
            rows.setdefault("dpdd_single: SSIM, previous 16-bit Gaussian vs official", []).append(
                ssim(nchw(restored), sixteen).item() - single_ssim
            )
            # GoPro / HIDE: MATLAB on the uint8 files.
            saved = np.uint8(np.rint(restored * 255))
            ours = PROTOCOLS["gopro_matlab"].score(nchw(saved / 255.0), nchw(sharp / 255.0), None)
            rows.setdefault("gopro_matlab: PSNR (dB), package vs MATLAB formula", []).append(
                ours["psnr"] - peak_signal_noise_ratio(sharp, saved)
            )
            rows.setdefault("gopro_matlab: SSIM, package vs MATLAB 3-D definition", []).append(
                ours["ssim"] - matlab_ssim_reference(saved, sharp)
            )
            rows.setdefault("gopro_matlab: SSIM, previous per-channel Gaussian vs MATLAB", []).append(
                ssim(nchw(saved / 255.0), nchw(sharp / 255.0)).item() - matlab_ssim_reference(saved, sharp)
            )
            # RealBlur: the saved 8-bit output, aligned.
            cv2.imwrite(str(target_file), sharp[:, :, ::-1])
            cv2.imwrite(str(saved_file), saved[:, :, ::-1])
            ours = PROTOCOLS["realblur"].score(nchw(saved / 255.0), nchw(sharp / 255.0), None)
            ref_psnr, ref_ssim = realblur_reference(saved_file, target_file)
            rows.setdefault("realblur: PSNR (dB), package vs evaluate_realblur.py", []).append(ours["psnr"] - ref_psnr)
            rows.setdefault("realblur: SSIM, package vs evaluate_realblur.py", []).append(ours["ssim"] - ref_ssim)
    print(f"{args.pairs} pairs of {args.size} x {args.size} px; absolute differences")
    for name, differences in rows.items():
        print(report(name, differences))


if __name__ == "__main__":
    main()
