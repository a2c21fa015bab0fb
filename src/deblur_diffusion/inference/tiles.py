"""Whole-image and overlapping-tile inference for any model of the package.

Tiled inference runs the model on ``tile_size`` windows placed every ``stride`` pixels, the last
one snapped to the border (the Swintormer paper's protocol: 256 and 220), a few tiles at a time,
and averages the outputs where tiles overlap: uniformly, or with a smooth Gaussian window that
lowers seams. Extra input channels (dual-pixel views, a diffusion prior) are cut with the image.
Memory grows with the tile batch, not with the image; only the accumulated output is image-sized.
Overlaps are accumulated in float64, so averaging k copies of a value gives it back exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import product

import torch
from rich.progress import Progress

from deblur_diffusion.models.blocks import pad_bottom_right

MODES = ("whole", "tiles")
BLENDS = ("uniform", "gaussian")

Model = Callable[[torch.Tensor], torch.Tensor]


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with tiles of ``tile`` every ``stride`` pixels; the
    last tile ends at the border. A side no longer than a tile has one tile at 0."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def blend_window(tile: int, blend: str, device: torch.device) -> torch.Tensor:
    """(tile, tile) weights of one tile's output: ones, or a separable Gaussian (sigma tile/4)."""
    if blend == "uniform":
        return torch.ones(tile, tile, dtype=torch.float64, device=device)
    centre = (tile - 1) / 2
    profile = torch.exp(-0.5 * ((torch.arange(tile, dtype=torch.float64, device=device) - centre) / (tile / 4)) ** 2)
    return profile[:, None] * profile[None, :]


def _dihedral(image: torch.Tensor, transpose: bool, flip_h: bool, flip_w: bool, inverse: bool = False) -> torch.Tensor:
    """One of the 8 flips and transposes of an NCHW tensor, or its inverse."""
    flips = [dim for dim, flip in ((-2, flip_h), (-1, flip_w)) if flip]
    if inverse:
        image = image.flip(flips) if flips else image
        return image.transpose(-2, -1) if transpose else image
    image = image.transpose(-2, -1) if transpose else image
    return image.flip(flips) if flips else image


class Inference:
    """Runs a model on whole images or on overlapping tiles (``mode``).

    Args:
        mode: ``"whole"`` or ``"tiles"``.
        tile_size: tile side in pixels.
        stride: step between tiles in pixels (at most ``tile_size``).
        tile_batch_size: tiles per model call; bounds the memory.
        blend: ``"uniform"`` averaging or ``"gaussian"`` weighting of overlaps.
        progress: show a progress bar when an image has at least ``progress_min_tiles`` tiles.
        self_ensemble: average the outputs over the 8 flips and transposes of the input (x8 time).
    """

    def __init__(
        self,
        mode: str = "whole",
        tile_size: int = 256,
        stride: int = 220,
        tile_batch_size: int = 8,
        blend: str = "uniform",
        progress: bool = False,
        progress_min_tiles: int = 32,
        self_ensemble: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"inference.mode must be one of {MODES}, got {mode!r}")
        if blend not in BLENDS:
            raise ValueError(f"inference.blend must be one of {BLENDS}, got {blend!r}")
        if not 0 < stride <= tile_size:
            raise ValueError(f"inference.stride must be in (0, tile_size={tile_size}], got {stride}")
        if tile_batch_size < 1:
            raise ValueError(f"inference.tile_batch_size must be positive, got {tile_batch_size}")
        self.mode = mode
        self.tile_size = tile_size
        self.stride = stride
        self.tile_batch_size = tile_batch_size
        self.blend = blend
        self.progress = progress
        self.progress_min_tiles = progress_min_tiles
        self.self_ensemble = self_ensemble
        # Called with (tiles done, tiles of the image) after each call of the model on tiles: how the
        # app moves its progress bar.
        self.report_tiles: Callable[[int, int], None] | None = None

    def __call__(self, model: Model, image: torch.Tensor) -> torch.Tensor:
        if not self.self_ensemble:
            return self.run(model, image)
        total = None
        for transpose, flip_h, flip_w in product((False, True), repeat=3):
            restored = _dihedral(self.run(model, _dihedral(image, transpose, flip_h, flip_w)), transpose, flip_h, flip_w, inverse=True)
            total = restored.double() if total is None else total + restored.double()
        return (total / 8).to(image.dtype)

    def run(self, model: Model, image: torch.Tensor) -> torch.Tensor:
        """One pass, whole or tiled, without the ensemble."""
        if self.mode == "whole":
            return model(image)
        return self.tiled(model, image)

    def tiled(self, model: Model, image: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = image.shape
        tile = self.tile_size
        padded = pad_bottom_right(image, max(0, tile - height), max(0, tile - width))
        boxes = list(product(tile_starts(padded.shape[-2], tile, self.stride), tile_starts(padded.shape[-1], tile, self.stride)))
        window = blend_window(tile, self.blend, image.device)
        output = None
        weight = torch.zeros(padded.shape[-2:], dtype=torch.float64, device=image.device)
        show = self.progress and len(boxes) * batch >= self.progress_min_tiles
        with Progress(transient=True, disable=not show) as progress:
            task = progress.add_task(f"tiles of {height}x{width}", total=len(boxes))
            for first in range(0, len(boxes), self.tile_batch_size):
                chunk = boxes[first : first + self.tile_batch_size]
                tiles = torch.cat([padded[..., y : y + tile, x : x + tile] for y, x in chunk])
                restored = model(tiles).to(torch.float64)
                if output is None:
                    output = torch.zeros(batch, restored.shape[1], *padded.shape[-2:], dtype=torch.float64, device=image.device)
                for index, (y, x) in enumerate(chunk):
                    output[..., y : y + tile, x : x + tile] += restored[index * batch : (index + 1) * batch] * window
                    weight[y : y + tile, x : x + tile] += window
                progress.advance(task, len(chunk))
                if self.report_tiles is not None:
                    self.report_tiles(first + len(chunk), len(boxes))
        return (output / weight)[..., :height, :width].to(image.dtype)
