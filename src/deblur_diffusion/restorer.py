"""Restoring images with a trained model, whatever file it comes in.

    from deblur_diffusion import load_pretrained
    restorer = load_pretrained("outputs/.../checkpoints/step0300000.ckpt")   # or an export folder
    sharp = restorer.restore_image(Image.open("blurry.png"))

See :mod:`deblur_diffusion.weights` for the files that load.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from deblur_diffusion.data.io import to_float, to_integer_image
from deblur_diffusion.errors import ConfigError, DeblurError
from deblur_diffusion.inference import Inference
from deblur_diffusion.inference.onnx import cached_graph, chosen_backend
from deblur_diffusion.weights import load_network

# The arithmetic of the network's forward: torch.autocast to this dtype (None: float32 throughout).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Out of memory: retry on tiles halved down to this side.
SMALLEST_TILE = 64
# Whole-image budget (whole_image_budget): the side of the image whose forward is measured on a
# GPU, the share of free memory left to the allocator's fragmentation and to the tiles' stitching,
# and the budget on a CPU (2048 x 2048).
PROBE_SIDE = 256
MEMORY_MARGIN = 0.3
CPU_MAX_PIXELS = 2048 * 2048
LOG = logging.getLogger("deblur_diffusion")


class OutOfMemoryError(DeblurError):
    """The device ran out of memory even on the smallest tiles."""


# How allocation failures arrive besides torch.OutOfMemoryError: as RuntimeErrors from cuDNN,
# cuBLAS and the CPU allocator.
OUT_OF_MEMORY_MARKERS = ("CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED", "can't allocate memory", "out of memory")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device (or the host) ran out of memory."""
    return isinstance(error, torch.OutOfMemoryError) or any(marker in str(error) for marker in OUT_OF_MEMORY_MARKERS)


def smaller_tiles(inference: Inference) -> Inference | None:
    """The next inference to try after running out of memory: one tile per call, then tiles of half
    the side with the same overlap ratio (whole images first become tiles); None below ``SMALLEST_TILE``."""
    smaller = copy.copy(inference)
    if inference.mode == "whole":
        smaller.mode = "tiles"
    elif inference.tile_batch_size > 1:
        smaller.tile_batch_size = 1
    elif inference.tile_size // 2 >= SMALLEST_TILE:
        smaller.tile_size = inference.tile_size // 2
        smaller.stride = max(1, inference.stride * smaller.tile_size // inference.tile_size)
    else:
        return None
    return smaller


class Restorer:
    """A loaded network with its inference settings: restores tensors, arrays and PIL images.

    Args:
        net: the network (moved to ``device`` and set to eval mode).
        inference: whole-image or tiled inference, optional x8 self-ensemble.
        device: where to run (``auto``: CUDA when there is a GPU).
        weights: which weights ``net`` holds (``ema``, ``raw``, an official file's key), for records.
        views: for a dual-pixel network, the order it reads the views in (``LoadedNetwork.views``).
        precision: ``fp32``, ``bf16`` or ``fp16``: the forward runs under ``torch.autocast`` to that
            type (outputs are float32 either way). See docs/guides/inference.md for each model's accuracy against fp32.
        backend: ``torch``, ``onnxruntime`` (the network's ONNX graph, exported once per weights into
            the cache; within 1e-4 of PyTorch and 1.6-2.5x faster on a CPU) or ``auto``: ONNX Runtime
            when it applies (CPU, fp32, installed, a one-graph network), else PyTorch.
        net_config: the network's architecture config, which names its ONNX graph with the weights.

    A device that runs out of memory (``torch.OutOfMemoryError``, or an allocation failure that
    cuDNN, cuBLAS or the CPU allocator reports as a RuntimeError) is retried on tiles, then on
    smaller tiles (down to 64 px), instead of failing; each fallback is logged, and the tiles that
    fitted are kept for the restorer's later calls.
    """

    def __init__(
        self,
        net: nn.Module,
        inference: Inference | None = None,
        device: str | torch.device = "auto",
        weights: str = "",
        precision: str = "fp32",
        views: list[str] | None = None,
        backend: str = "torch",
        net_config: Mapping | None = None,
    ):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.weights = weights
        self.views = views
        self.precision = precision
        self.device = pick_device(device) if isinstance(device, str) else torch.device(device)
        self.net = net.to(self.device).eval()
        self.backend = chosen_backend(backend, self.net, self.device, precision, net_config)
        # What the inference calls: the network, or its ONNX Runtime graph.
        self.forward = self.net
        if self.backend == "onnxruntime":
            try:
                self.forward = cached_graph(self.net, net_config)
            except Exception as error:  # the export or the cache failed: auto falls back, an explicit choice says why
                if backend == "onnxruntime":
                    raise ConfigError(f"backend=onnxruntime: the network's ONNX graph could not be made ({error})") from error
                LOG.warning("restoring through PyTorch: the network's ONNX graph could not be made (%s)", error)
                self.backend = "torch"
        self.inference = inference or Inference()
        # The smaller tiles that the last out-of-memory error fell back to, used from then on.
        self.fallback: Inference | None = None
        self.input_channels = net.input_channels
        self.needs_sharp = net.needs_sharp_input

    @torch.no_grad()
    def restore(self, blurry: torch.Tensor, sharp: torch.Tensor | None = None, inference: Inference | None = None) -> torch.Tensor:
        """(B, C, H, W) or (C, H, W) in [0, 1] -> the restored RGB in [0, 1], on the input's device.

        ``sharp`` is only for a stage-one HI-Diff network, whose prior comes from the sharp image.
        ``inference`` replaces the restorer's own for this call (``predict``: tiles for large photos).
        """
        single = blurry.ndim == 3
        batch = blurry[None] if single else blurry
        if batch.ndim != 4 or batch.shape[1] != self.input_channels:
            raise ValueError(f"the model reads (B, {self.input_channels}, H, W) inputs, got {tuple(blurry.shape)}")
        if self.needs_sharp:
            if sharp is None:
                raise ValueError("a stage-one HI-Diff network computes its prior from the sharp image: pass sharp=, or use stage two")
            batch = torch.cat([batch, sharp[None] if single else sharp], dim=1)
        restored = self._run(batch.to(self.device, torch.float32), inference or self.inference).clamp(0.0, 1.0).to(blurry.device)
        return restored[0] if single else restored

    def _run(self, batch: torch.Tensor, inference: Inference) -> torch.Tensor:
        dtype = PRECISIONS[self.precision]
        # After running out of memory once, the tiles that fitted serve every later image too
        # (a folder of photos of one camera would otherwise fail on each of them first).
        inference = self.fallback or inference
        while True:
            try:
                with torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                    return inference(self.forward, batch).float()
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not out_of_memory(error):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                fallback = smaller_tiles(inference)
                if fallback is None:
                    raise OutOfMemoryError(
                        f"{self.device} ran out of memory even on {inference.tile_size} px tiles, one per call ({error}); "
                        "use precision=bf16 or another device"
                    ) from error
                LOG.warning(
                    "out of memory on %s; retrying on %d px tiles every %d px, %d per call (and so for the next images)",
                    "the whole image" if inference.mode == "whole" else f"{inference.tile_size} px tiles",
                    fallback.tile_size,
                    fallback.stride,
                    fallback.tile_batch_size,
                )
                inference = self.fallback = fallback

    def restore_image(self, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        """Restores a PIL image (returned as an 8-bit RGB PIL image) or an H x W x C array (uint8,
        uint16 or float in [0, 1]; returned with the same dtype)."""
        if isinstance(image, Image.Image):
            restored = self.restore(torch.from_numpy(to_float(np.asarray(image.convert("RGB")))).permute(2, 0, 1))
            return Image.fromarray(to_integer_image(restored.permute(1, 2, 0).numpy(), 8))
        bit_depth = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(image.dtype)
        if bit_depth is None and not np.issubdtype(image.dtype, np.floating):
            raise DeblurError(f"restore_image takes a PIL image or a uint8, uint16 or float array, got a {image.dtype} array")
        pixels = to_float(image) if bit_depth else image.astype(np.float32)
        restored = self.restore(torch.from_numpy(pixels).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        return to_integer_image(restored, bit_depth) if bit_depth else restored.astype(image.dtype)


def load_pretrained(
    weights: str | Path | Mapping[str, str],
    net_config: Mapping | None = None,
    inference: Inference | None = None,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    backend: str = "torch",
) -> Restorer:
    """A :class:`Restorer` for the weights (Lightning checkpoint, export folder or official files;
    an official Restormer or Swintormer file needs no ``net_config``).

    Without ``inference``, the settings the model was trained or exported with are used (whole
    images when there are none). ``device="auto"`` runs on the GPU when there is one;
    ``backend="auto"`` runs through ONNX Runtime where it applies (see :class:`Restorer`).
    """
    loaded = load_network(weights, net_config)
    if inference is None:
        settings = {k: v for k, v in loaded.inference_config.items() if k != "_target_"}
        inference = Inference(**settings)
    return Restorer(loaded.net, inference, device, loaded.weights, precision, loaded.views, backend, loaded.net_config)


def whole_image_budget(restorer: Restorer, max_pixels: int | str = "auto") -> int:
    """The most pixels an image may have to be restored whole (larger ones go on tiles).

    ``max_pixels`` as a number is that budget. ``"auto"``: on a GPU, what fits in the memory free
    now, from the peak memory of one forward of a ``PROBE_SIDE``-px image (the networks' activations
    grow linearly with the pixels: channel attention, windowed attention, convolutions) with
    ``MEMORY_MARGIN`` left over; elsewhere ``CPU_MAX_PIXELS``, as the CPU's allocator reports no peak.
    """
    if max_pixels != "auto":
        if not isinstance(max_pixels, int) or max_pixels < 1:
            raise ConfigError(f"max_pixels must be a positive number of pixels or 'auto', got {max_pixels!r}")
        return max_pixels
    if restorer.device.type != "cuda":
        return CPU_MAX_PIXELS
    channels = restorer.input_channels * (2 if restorer.needs_sharp else 1)
    probe = torch.zeros(1, channels, PROBE_SIDE, PROBE_SIDE, device=restorer.device)
    torch.cuda.synchronize(restorer.device)
    torch.cuda.reset_peak_memory_stats(restorer.device)
    before = torch.cuda.memory_allocated(restorer.device)
    dtype = PRECISIONS[restorer.precision]
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext():
            restorer.net(probe)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not out_of_memory(error):
            raise
        torch.cuda.empty_cache()
        LOG.warning("out of memory on a %d px probe: every image goes on tiles", PROBE_SIDE)
        return PROBE_SIDE**2
    bytes_per_pixel = (torch.cuda.max_memory_allocated(restorer.device) - before) / PROBE_SIDE**2
    del probe
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(restorer.device)
    budget = int(free * (1 - MEMORY_MARGIN) / max(bytes_per_pixel, 1.0))
    LOG.info(
        "whole images up to %.1f MP on %s (%.0f bytes per pixel, %.1f GiB free)",
        budget / 1e6,
        restorer.device,
        bytes_per_pixel,
        free / 2**30,
    )
    return budget


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
