"""Restormer (Zamir et al., CVPR 2022): the baseline of both papers.

A 4-level U-Net of Transformer blocks (MDTA + GDFN). Channels double and resolution halves at each
level; the decoder concatenates the encoder features, reduces channels with a 1x1 conv at levels
3 and 2 but keeps 2*dim at level 1, and a refinement stage runs at full resolution.

The dual-pixel variant (``dual_pixel_task=True``) takes the left and right views as 6 channels,
adds a 1x1 skip from the stem to the refined features and predicts the sharp image directly
(there is no single input image to add back).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from deblur_diffusion.models.blocks import (
    FourLevelUNet,
    OverlapPatchEmbed,
    TransformerBlock,
    layer_norm_has_bias,
    pad_to_multiple,
)


class Restormer(FourLevelUNet):
    """Restormer with the official constructor arguments and parameter names.

    Any input size is accepted: the input is reflect-padded to a multiple of 8 (three
    downsamplings) and the output cropped back. ``checkpoint_levels`` (level names) recompute
    those levels' activations in the backward pass to save memory.
    """

    official_files: ClassVar[dict[str, str]] = {"": "net_g"}

    size_multiple = 2 ** (FourLevelUNet.LEVELS - 1)

    def __init__(
        self,
        inp_channels: int = 3,
        out_channels: int = 3,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        LayerNorm_type: str = "WithBias",
        dual_pixel_task: bool = False,
        checkpoint_levels: Sequence[str] = (),
    ):
        super().__init__()
        if not dual_pixel_task and inp_channels < out_channels:
            raise ValueError(
                f"inp_channels={inp_channels} < out_channels={out_channels}: the residual is taken from the "
                "first out_channels input channels"
            )
        self.input_channels = inp_channels
        self.out_channels = out_channels
        self.dual_pixel_task = dual_pixel_task
        self.set_checkpoint_levels(checkpoint_levels)
        ln_bias = layer_norm_has_bias(LayerNorm_type)

        def stage(width: int, n_heads: int, depth: int) -> nn.Sequential:
            return nn.Sequential(*(TransformerBlock(width, n_heads, ffn_expansion_factor, bias, ln_bias) for _ in range(depth)))

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.build_levels(stage, dim, num_blocks, num_refinement_blocks, heads, bias)
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"Restormer expects a (B, {self.input_channels}, H, W) tensor, got {tuple(x.shape)}")
        padded, (height, width) = pad_to_multiple(x, self.size_multiple)

        stem = self.patch_embed(padded)
        refined = self.encode_decode(stem)

        out = self.output(refined + self.skip_conv(stem)) if self.dual_pixel_task else self.output(refined) + padded[:, : self.out_channels]
        return out[..., :height, :width]
