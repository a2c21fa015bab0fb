"""Pictures people look at: side-by-side comparisons with labels."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from deblur_diffusion.data.io import to_integer_image

_MIN_DISPLAY_WIDTH = 192
_HEADER_HEIGHT = 18
_GAP = 4


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = torch.mean((image.float() - reference.float()) ** 2).clamp_min(1e-12)
    return float(10 * torch.log10(1.0 / mse))


def _to_display(image: torch.Tensor, zoom: int) -> np.ndarray:
    pixels = to_integer_image(image[:3].detach().float().cpu().numpy().transpose(1, 2, 0), 8)
    if zoom > 1:
        pixels = cv2.resize(pixels, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    return pixels


def _labelled(pixels: np.ndarray, label: str) -> np.ndarray:
    header = np.full((_HEADER_HEIGHT, pixels.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(header, label, (3, _HEADER_HEIGHT - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, pixels], axis=0)


def comparison_row(blurry: torch.Tensor, restored: torch.Tensor, sharp: torch.Tensor, title: str = "") -> np.ndarray:
    """One row ``blurry | restored | sharp`` (3 x H x W tensors in [0, 1]) with PSNR labels.

    Small images are enlarged by an integer factor (nearest neighbour, pixels stay visible).
    """
    zoom = max(1, -(-_MIN_DISPLAY_WIDTH // sharp.shape[-1]))
    panels = [
        _labelled(_to_display(blurry, zoom), f"blurry {psnr(blurry, sharp):.2f} dB"),
        _labelled(_to_display(restored, zoom), f"restored {psnr(restored, sharp):.2f} dB"),
        _labelled(_to_display(sharp, zoom), "sharp"),
    ]
    gap = np.full((panels[0].shape[0], _GAP, 3), 255, dtype=np.uint8)
    row = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    return _labelled(row, title) if title else row


def stack_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Stacks rows of possibly different widths, padding with white on the right."""
    width = max(r.shape[1] for r in rows)
    padded = []
    for row in rows:
        pad = np.full((row.shape[0], width - row.shape[1], 3), 255, dtype=np.uint8)
        padded += [np.concatenate([row, pad], axis=1), np.full((_GAP, width, 3), 255, dtype=np.uint8)]
    return np.concatenate(padded[:-1], axis=0)
