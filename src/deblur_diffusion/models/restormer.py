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

import torch
from torch import nn

from deblur_diffusion.models.blocks import (
    Downsample,
    OverlapPatchEmbed,
    TransformerBlock,
    Upsample,
    layer_norm_has_bias,
    pad_to_multiple,
)

_LEVELS = 4


class Restormer(nn.Module):
    """Restormer with the official constructor arguments and parameter names.

    Any input size is accepted: the input is reflect-padded to a multiple of 8 (three
    downsamplings) and the output cropped back.
    """

    size_multiple = 2 ** (_LEVELS - 1)

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
        LayerNorm_type: str = "WithBias",  # noqa: N803 - official argument name, kept for config parity
        dual_pixel_task: bool = False,
    ):
        super().__init__()
        if len(num_blocks) != _LEVELS or len(heads) != _LEVELS:
            raise ValueError(f"num_blocks and heads need {_LEVELS} entries, got {list(num_blocks)} and {list(heads)}")
        if not dual_pixel_task and inp_channels < out_channels:
            raise ValueError(
                f"inp_channels={inp_channels} < out_channels={out_channels}: the residual is taken from the "
                "first out_channels input channels"
            )
        self.inp_channels = inp_channels
        self.out_channels = out_channels
        self.dual_pixel_task = dual_pixel_task
        ln_bias = layer_norm_has_bias(LayerNorm_type)

        def stage(width: int, n_heads: int, depth: int) -> nn.Sequential:
            return nn.Sequential(
                *(TransformerBlock(width, n_heads, ffn_expansion_factor, bias, ln_bias) for _ in range(depth))
            )

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)

        self.encoder_level1 = stage(dim, heads[0], num_blocks[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = stage(dim * 2, heads[1], num_blocks[1])
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = stage(dim * 4, heads[2], num_blocks[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = stage(dim * 8, heads[3], num_blocks[3])

        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = stage(dim * 4, heads[2], num_blocks[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level2 = stage(dim * 2, heads[1], num_blocks[1])
        self.up2_1 = Upsample(dim * 2)
        self.decoder_level1 = stage(dim * 2, heads[0], num_blocks[0])

        self.refinement = stage(dim * 2, heads[0], num_refinement_blocks)
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.inp_channels:
            raise ValueError(f"Restormer expects a (B, {self.inp_channels}, H, W) tensor, got {tuple(x.shape)}")
        padded, (height, width) = pad_to_multiple(x, self.size_multiple)

        stem = self.patch_embed(padded)
        enc1 = self.encoder_level1(stem)
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))

        dec3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], dim=1)))
        dec2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], dim=1)))
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], dim=1))
        refined = self.refinement(dec1)

        if self.dual_pixel_task:
            out = self.output(refined + self.skip_conv(stem))
        else:
            out = self.output(refined) + padded[:, : self.out_channels]
        return out[..., :height, :width]
