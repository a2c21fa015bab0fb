"""The architecture of an official release file, read off its weights (as spandrel reads them).

The official ``.pth`` files hold only a state dict; their test scripts hard-code the constructor
arguments. :func:`infer_network_config` recovers them from the parameter names and shapes, so that
a released file loads with no config:

* Restormer (single image, dual-pixel, the motion-deblurring and deraining releases): input and
  output channels, ``dim``, blocks per level, refinement blocks, heads per level (the MDTA
  ``temperature`` has one entry per head), FFN width, bias, LayerNorm type and the dual-pixel head.
* Swintormer: input channels (3, 6 or 9, behind the pixel-unshuffle stem), ``dim``, blocks, heads
  (one ``logit_scale`` per head), FFN width and bias. The attention window is not held by any weight
  (its position tables are computed): the released value (16) is used unless given.

Anything else fails naming what was recognised and what did not fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from deblur_diffusion.checkpoints import CheckpointError

# FFN expansion factors tried before one derived from the widths (int(width * factor) must give
# every level's hidden width): 2.66, the constructor default of Restormer (restormer_arch.py) and
# Swintormer (Swintormer_arch.py) that their releases use; 2, HI-Diff's RealBlur transformer
# (its RealBlur option files); the others are round values a user's variant may take.
KNOWN_FFN_FACTORS = (2.66, 2.0, 3.0, 4.0, 1.0)
LEVEL_PREFIXES = ("encoder_level1", "encoder_level2", "encoder_level3", "latent")
LEVEL_WIDTHS = (1, 2, 4, 8)
# Swintormer_arch.py's constructor default; the released option file (train_swintormer.yml) keeps it.
SWINTORMER_RELEASED_WINDOW = 16
# The factor by which Swintormer's stem (PixelUnshuffle(2)) multiplies the input channels.
SWINTORMER_STEM_UNSHUFFLE = 4


class ArchitectureError(CheckpointError):
    """The weights match no architecture this package knows."""


def _blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(match.group(1)) for key in state if (match := re.match(rf"{prefix}\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _ffn_factor(state: Mapping[str, torch.Tensor], dim: int, source: str) -> float:
    hidden = {
        width: state[f"{prefix}.0.ffn.project_out.weight"].shape[1] for prefix, width in zip(LEVEL_PREFIXES, LEVEL_WIDTHS, strict=True)
    }
    candidates = (*KNOWN_FFN_FACTORS, hidden[8] / (8 * dim) + 1e-6)
    for factor in candidates:
        if all(int(width * dim * factor) == value for width, value in hidden.items()):
            return factor
    raise ArchitectureError(f"{source}: no FFN expansion factor gives the hidden widths {hidden} of levels of width dim x {LEVEL_WIDTHS}")


def _levels(state: Mapping[str, torch.Tensor], head_parameter: str, source: str) -> dict:
    """What Restormer and Swintormer share: dim, blocks and heads per level, refinement, FFN, bias."""
    blocks = [_blocks(state, prefix) for prefix in LEVEL_PREFIXES]
    if 0 in blocks:
        missing = [prefix for prefix, count in zip(LEVEL_PREFIXES, blocks, strict=True) if not count]
        raise ArchitectureError(f"{source}: a four-level U-Net of transformer blocks, but no blocks under {missing}")
    dim = state["encoder_level1.0.norm1.body.weight"].shape[0]
    return {
        "dim": dim,
        "num_blocks": blocks,
        "num_refinement_blocks": _blocks(state, "refinement"),
        "heads": [state[f"{prefix}.0.attn.{head_parameter}"].shape[0] for prefix in LEVEL_PREFIXES],
        "ffn_expansion_factor": _ffn_factor(state, dim, source),
        "bias": "encoder_level1.0.attn.qkv.bias" in state,
    }


def _restormer(state: Mapping[str, torch.Tensor], source: str) -> dict:
    return {
        "_target_": "deblur_diffusion.models.Restormer",
        "inp_channels": state["patch_embed.proj.weight"].shape[1],
        "out_channels": state["output.weight"].shape[0],
        **_levels(state, "temperature", source),
        "LayerNorm_type": "WithBias" if "encoder_level1.0.norm1.body.bias" in state else "BiasFree",
        "dual_pixel_task": "skip_conv.weight" in state,
    }


def _swintormer(state: Mapping[str, torch.Tensor], source: str) -> dict:
    stem_channels = state["patch_embed.proj2.weight"].shape[1]
    if stem_channels % SWINTORMER_STEM_UNSHUFFLE:
        raise ArchitectureError(f"{source}: a Swintormer stem with {stem_channels} channels, not 4 x the input channels")
    if "encoder_level1.0.norm1.body.bias" not in state:
        raise ArchitectureError(f"{source}: a Swintormer without LayerNorm biases, which no release has")
    return {
        "_target_": "deblur_diffusion.models.Swintormer",
        "inp_channels": stem_channels // SWINTORMER_STEM_UNSHUFFLE,
        **_levels(state, "logit_scale", source),
        "window_size": SWINTORMER_RELEASED_WINDOW,
        "LayerNorm_type": "WithBias",
    }


# The key that identifies each architecture, and the reader of its arguments.
_ARCHITECTURES = {
    "Swintormer": ("encoder_level1.0.attn.logit_scale", _swintormer),
    "Restormer": ("encoder_level1.0.attn.temperature", _restormer),
}


def infer_network_config(state: Mapping[str, torch.Tensor], source: str, overrides: Mapping | None = None) -> dict:
    """The network config (``_target_`` and constructor arguments) of an official state dict;
    ``overrides`` replace inferred values (e.g. ``window_size``, which weights do not hold)."""
    for name, (marker, read) in _ARCHITECTURES.items():
        if marker in state:
            try:
                config = read(state, source)
            except KeyError as missing:
                raise ArchitectureError(f"{source}: looks like a {name} ({marker}) but has no {missing}") from missing
            unknown = set(overrides or {}) - set(config)
            if unknown:
                raise ArchitectureError(f"{source}: {sorted(unknown)} are not arguments of the {name} read off its weights")
            return {**config, **(overrides or {})}
    shown = ", ".join(list(state)[:6])
    raise ArchitectureError(
        f"{source} matches no known architecture (Restormer: {_ARCHITECTURES['Restormer'][0]}, Swintormer: "
        f"{_ARCHITECTURES['Swintormer'][0]}); it holds {len(state)} tensors, e.g. {shown}. Give its config (model=...)"
    )
