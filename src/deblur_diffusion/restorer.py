"""Restoring images with a trained model, whatever file it comes in.

    from deblur_diffusion import load_pretrained
    restorer = load_pretrained("outputs/.../checkpoints/step0300000.ckpt")   # or an export folder
    sharp = restorer.restore_image(Image.open("blurry.png"))

See :mod:`deblur_diffusion.weights` for the files that load.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from deblur_diffusion.inference import Inference
from deblur_diffusion.weights import load_network


class Restorer:
    """A loaded network with its inference settings: restores tensors, arrays and PIL images.

    Args:
        net: the network (moved to ``device`` and set to eval mode).
        inference: whole-image or tiled inference, optional x8 self-ensemble.
        device: where to run.
        weights: which weights ``net`` holds (``ema``, ``raw``, an official file's key), for records.
    """

    def __init__(self, net: nn.Module, inference: Inference | None = None, device: str | torch.device = "cpu", weights: str = ""):
        self.weights = weights
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.inference = inference or Inference()
        self.input_channels = net.input_channels
        self.needs_sharp = net.needs_sharp_input

    @torch.no_grad()
    def restore(self, blurry: torch.Tensor, sharp: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) or (C, H, W) in [0, 1] -> the restored RGB in [0, 1], on the input's device.

        ``sharp`` is only for a stage-one HI-Diff network, whose prior comes from the sharp image.
        """
        single = blurry.ndim == 3
        batch = blurry[None] if single else blurry
        if batch.ndim != 4 or batch.shape[1] != self.input_channels:
            raise ValueError(f"the model reads (B, {self.input_channels}, H, W) inputs, got {tuple(blurry.shape)}")
        if self.needs_sharp:
            if sharp is None:
                raise ValueError("a stage-one HI-Diff network computes its prior from the sharp image: pass sharp=, or use stage two")
            batch = torch.cat([batch, sharp[None] if single else sharp], dim=1)
        restored = self.inference(self.net, batch.to(self.device, torch.float32)).clamp(0.0, 1.0).to(blurry.device)
        return restored[0] if single else restored

    def restore_image(self, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        """Restores a PIL image (returned as an 8-bit RGB PIL image) or an H x W x C array (uint8,
        uint16 or float in [0, 1]; returned with the same dtype)."""
        if isinstance(image, Image.Image):
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            restored = self.restore(torch.from_numpy(array).permute(2, 0, 1))
            return Image.fromarray(np.round(restored.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        dtype = image.dtype
        scale = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0
        restored = self.restore(torch.from_numpy(image.astype(np.float32) / scale).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        return np.round(restored * scale).astype(dtype) if scale != 1.0 else restored.astype(dtype)


def load_pretrained(
    weights: str | Path | Mapping[str, str],
    net_config: Mapping | None = None,
    inference: Inference | None = None,
    device: str | torch.device = "cpu",
) -> Restorer:
    """A :class:`Restorer` for the weights (Lightning checkpoint, export folder or official files).

    Without ``inference``, the settings the model was trained or exported with are used (whole
    images when there are none).
    """
    loaded = load_network(weights, net_config)
    if inference is None:
        settings = {k: v for k, v in loaded.inference_config.items() if k != "_target_"}
        inference = Inference(**settings)
    return Restorer(loaded.net, inference, device, loaded.weights)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
