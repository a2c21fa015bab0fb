"""Swintormer (Chen and Liu, "Efficient Image Deblurring Networks based on Diffusion Models").

A 4-level U-Net like Restormer, with three differences that follow the official code:

* the stem pixel-unshuffles the input by 2 before a 3x3 conv, so level 1 runs at H/2 x W/2, and the
  head is a 3x3 conv to 12 channels and a pixel-shuffle back to full resolution;
* every block's attention works inside (shifted) windows and splits its q/k/v channels in halves:
  one half does SwinV2-style spatial attention (cosine similarity with a learned logit scale, a
  continuous relative-position bias, the shift mask), the other MDTA-style channel attention over
  the window's tokens; both normalise with "softmax one", exp(x - max) / (1 + sum exp(x - max));
* the feed-forward network is a plain gated product (1x1 conv, x1 * x2, 1x1 conv).

Input channels: ``[image to restore (3) | extra views or prior (3 each)]``. The residual is always
the first three channels, so with 6 channels they are the blurry image (or, for dual-pixel DPDD as
in the official code, the right view) followed by the left view or the diffusion prior z0; with 9,
dual-pixel views then the prior. The image is scaled to [-1, 1] inside and back at the output.

Unlike the official code, any input size works: the input is reflect-padded to a multiple of
16 * window_size (three downsamplings after the stem, and whole windows at the coarsest level)
and the output cropped back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from deblur_diffusion.channels import IMAGE_CHANNELS
from deblur_diffusion.models.blocks import ChannelLayerNorm, FourLevelUNet, pad_to_multiple

_MAX_LOGIT_SCALE = math.log(100.0)
_SHIFT_MASK_VALUE = -100.0
# F.normalize's default.
_NORMALIZE_EPS = 1e-12
ATTENTION_SOFTMAX = ("softmax_one", "softmax")

# The official code checkpoints every level but the first.
OFFICIAL_CHECKPOINTED_LEVELS = FourLevelUNet.LEVEL_NAMES[1:]


class _SoftmaxOne(torch.autograd.Function):
    """exp(x - max) / (1 + sum exp(x - max)) with a hand-written backward pass.

    Autograd through the composite would store and revisit the N x N scores about fifteen times per
    attention; this does it in about ten. The gradient is the official composite's, including the
    path through the row maximum, which ``torch.max`` sends to the first maximal entry:
    ``dx = p * (g - c)``, minus ``c / (1 + sum exp(x - max))`` at that entry, with ``c = sum(g * p)``.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        row_max, argmax = scores.max(dim=-1, keepdim=True)
        weights = torch.exp(scores - row_max)
        denominator = weights.sum(dim=-1, keepdim=True).add_(1.0)
        weights.div_(denominator)
        ctx.save_for_backward(weights, denominator, argmax)
        return weights

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        weights, denominator, argmax = ctx.saved_tensors
        weighted = (grad * weights).sum(dim=-1, keepdim=True)
        grad_scores = (grad - weighted).mul_(weights)
        return grad_scores.scatter_add_(-1, argmax, -weighted / denominator)


def softmax_one(scores: torch.Tensor) -> torch.Tensor:
    """exp(x - max) / (1 + sum exp(x - max)) over the last axis, as the official code computes it.

    The extra 1 lets a row give little weight to every key. It is not expressible as a fused
    attention kernel (it depends on the row maximum), so attention with it runs as explicit matmuls.
    """
    return _SoftmaxOne.apply(scores)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    return rearrange(x, "b c (nh wh) (nw ww) -> (b nh nw) c wh ww", wh=window, ww=window)


def window_merge(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    return rearrange(windows, "(b nh nw) c wh ww -> b c (nh wh) (nw ww)", nh=height // window, nw=width // window)


# A mask takes windows x window^4 floats: 256 MiB for a 512 x 512 feature map with 16 px windows.
_CACHED_MASK_BYTES = 256 * 2**20


def shift_window_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(windows, N, N) additive mask for shifted windows: -100 between tokens that came from
    different image regions before the cyclic shift (they are not neighbours), 0 otherwise.

    It depends only on the feature map's size, so masks up to ``_CACHED_MASK_BYTES`` (training
    patches and tiles) are built once per size and device, two image sizes at a time; the official
    code rebuilds them on the CPU in every shifted block of every step. Larger ones (whole-image
    inference: 2.3 GB at level 1 of a DPDD image) are built on the device when needed and freed
    after the block, so that they do not stay on the device.
    """
    if (height // window) * (width // window) * window**4 * 4 > _CACHED_MASK_BYTES:
        return _build_shift_window_mask(height, width, window, shift, device)
    return _cached_shift_window_mask(height, width, window, shift, device)


def _build_shift_window_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    regions = torch.zeros(1, 1, height, width, device=device)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            regions[:, :, rows, cols] = label
            label += 1
    labels = window_partition(regions, window).flatten(1)
    # One float copy of the boolean mask (a whole-image mask is gigabytes).
    return (labels.unsqueeze(1) != labels.unsqueeze(2)).to(torch.float32).mul_(_SHIFT_MASK_VALUE)


# Each image size takes one mask per level (four): two sizes, e.g. two phases of a patch schedule.
_cached_shift_window_mask = functools.lru_cache(maxsize=8)(_build_shift_window_mask)


def log_spaced_relative_coordinates(window: int) -> torch.Tensor:
    """(2W-1, 2W-1, 2) relative offsets scaled to [-8, 8] and log-spaced, SwinV2's CPB input."""
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32) / (window - 1) * 8
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2W-1)^2 offset table for every pair of tokens of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


class MixedWindowAttention(nn.Module):
    """Shifted-window spatial attention and channel attention on the two halves of q/k/v.

    q/k/v come from a 1x1 conv and a 3x3 depthwise conv applied to each window separately (the
    depthwise conv sees zero padding at window borders, as in the official code).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias: bool,
        window_size: int,
        shift_size: int,
        attention_softmax: str = "softmax_one",
    ):
        super().__init__()
        if attention_softmax not in ATTENTION_SOFTMAX:
            raise ValueError(f"attention_softmax must be one of {ATTENTION_SOFTMAX}, got {attention_softmax!r}")
        if dim % 2 or (dim // 2) % num_heads:
            raise ValueError(f"dim={dim} must split into two halves divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.attention_softmax = attention_softmax
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
        self.register_buffer("relative_coords_table", log_spaced_relative_coordinates(window_size), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) continuous relative-position bias, 16 * sigmoid(MLP(offset))."""
        tokens = self.window_size**2
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(tokens, tokens, self.num_heads)
        return 16 * torch.sigmoid(bias.permute(2, 0, 1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, additive: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """softmax(q k^T + sum(additive)) v with the configured softmax; q carries its scale.
        The additive terms broadcast over the leading axes of the scores."""
        if self.attention_softmax == "softmax":
            return _fused_attention(q, k, v, additive)
        scores = q @ k.transpose(-2, -1)
        for term in additive:
            scores += term.to(scores.dtype)  # in place: the product itself is not kept for backward
        return softmax_one(scores) @ v

    def spatial_attention(self, qkv: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
        q, k, v = (rearrange(t, "(b n) (head c) h w -> b n head (h w) c", b=batch, head=self.num_heads) for t in qkv.chunk(3, dim=1))
        scale = torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp()
        # Normalised and scaled in one pass over q.
        q = q * (scale / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(_NORMALIZE_EPS))
        k = F.normalize(k, dim=-1, eps=_NORMALIZE_EPS)
        # (heads, N, N), and (windows, 1, N, N) with the shift mask; both broadcast over the batch.
        additive = [self.position_bias()]
        if self.shift_size > 0:
            additive.append(shift_window_mask(height, width, self.window_size, self.shift_size, qkv.device).unsqueeze(1))
        out = self._attend(q, k, v, additive)
        return rearrange(out, "b n head (h w) c -> (b n) (head c) h w", h=self.window_size, w=self.window_size)

    def channel_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(t, "b (head c) h w -> b head c (h w)", head=self.num_heads) for t in qkv.chunk(3, dim=1))
        out = self._attend(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v)
        return rearrange(out, "b head c (h w) -> b (head c) h w", h=self.window_size, w=self.window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(2, 3))
        windows = window_partition(x, self.window_size)
        # The depthwise conv over many small windows runs about twice as fast channels-last (oneDNN).
        qkv = self.qkv(windows).contiguous(memory_format=torch.channels_last)
        spatial_qkv, channel_qkv = self.qkv_dwconv(qkv).split(channels * 3 // 2, dim=1)
        mixed = torch.cat([self.spatial_attention(spatial_qkv, batch, height, width), self.channel_attention(channel_qkv)], dim=1)
        out = window_merge(self.project_out(mixed), self.window_size, height, width)
        if self.shift_size > 0:
            out = torch.roll(out, shifts=(self.shift_size, self.shift_size), dims=(2, 3))
        return out


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, additive: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``softmax`` variant through ``F.scaled_dot_product_attention`` on 4-D inputs (batch and
    windows merged), the layout its fused kernels accept; the additive terms become one mask."""
    out_shape = (*q.shape[:-1], v.shape[-1])
    mask = None
    if additive:
        mask = functools.reduce(torch.add, additive).to(q.dtype).expand(*q.shape[:-2], q.shape[-2], k.shape[-2])
    if q.ndim == 5:
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))
        mask = None if mask is None else mask.flatten(0, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0).view(out_shape)


class GatedProductFFN(nn.Module):
    """1x1 conv to 2 * hidden, product of the halves, 1x1 conv back (no depthwise conv, no GELU)."""

    def __init__(self, dim: int, expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.project_in(x).chunk(2, dim=1)
        return self.project_out(first * second)


class SwintormerBlock(nn.Module):
    """x + MixedWindowAttention(LN(x)), then x + GatedProductFFN(LN(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_expansion_factor: float,
        bias: bool,
        window_size: int,
        shift_size: int,
        attention_softmax: str,
    ):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, with_bias=True)
        self.attn = MixedWindowAttention(dim, num_heads, bias, window_size, shift_size, attention_softmax)
        self.norm2 = ChannelLayerNorm(dim, with_bias=True)
        self.ffn = GatedProductFFN(dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PixelUnshuffleEmbed(nn.Module):
    """Pixel-unshuffle by 2 (C -> 4C at half resolution), then a 3x3 conv to ``dim``."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.PixelUnshuffle(2)
        self.proj2 = nn.Conv2d(in_channels * 4, dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj(x))


class Swintormer(FourLevelUNet):
    """Swintormer with the official constructor arguments and parameter names.

    Args beyond the official ones:
        attention_softmax: ``"softmax_one"`` (official) or ``"softmax"``, which runs both attentions
            through ``F.scaled_dot_product_attention`` (the bias and shift mask as an additive mask).
        checkpoint_levels: level names whose activations are recomputed in the backward pass
            (``"official"``: every level but the first, as the official code does).
    """

    official_files: ClassVar[dict[str, str]] = {"": "net_g"}

    def __init__(
        self,
        inp_channels: int = 6,
        dim: int = 48,
        num_blocks: Sequence[int] = (2, 4, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        window_size: int = 16,
        LayerNorm_type: str = "WithBias",
        attention_softmax: str = "softmax_one",
        checkpoint_levels: Sequence[str] | str = (),
    ):
        super().__init__()
        if inp_channels < IMAGE_CHANNELS or inp_channels % IMAGE_CHANNELS:
            raise ValueError(f"inp_channels must be 3, 6 or 9 (image, then extra views/prior), got {inp_channels}")
        if window_size < 2:
            raise ValueError(f"window_size must be at least 2, got {window_size}")
        if checkpoint_levels == "official":
            checkpoint_levels = OFFICIAL_CHECKPOINTED_LEVELS
        self.input_channels = inp_channels
        self.window_size = window_size
        self.set_checkpoint_levels(checkpoint_levels)
        self.size_multiple = 2**self.LEVELS * window_size

        def stage(width: int, n_heads: int, depth: int) -> nn.Sequential:
            return nn.Sequential(
                *(
                    SwintormerBlock(
                        width,
                        n_heads,
                        ffn_expansion_factor,
                        bias,
                        window_size,
                        0 if i % 2 == 0 else window_size // 2,
                        attention_softmax,
                    )
                    for i in range(depth)
                )
            )

        self.patch_embed = PixelUnshuffleEmbed(inp_channels, dim)
        self.build_levels(stage, dim, num_blocks, num_refinement_blocks, heads, bias)
        self.skip_conv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.apply(_init_weights)
        # Created after the initialisation, as in the official code: the head keeps PyTorch's default.
        self.output = nn.Sequential(nn.Conv2d(dim * 2, IMAGE_CHANNELS * 4, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"Swintormer expects a (B, {self.input_channels}, H, W) tensor, got {tuple(x.shape)}")
        padded, (height, width) = pad_to_multiple(2 * x - 1, self.size_multiple)

        stem = self.patch_embed(padded)
        refined = self.encode_decode(stem) + self.skip_conv(stem)

        out = self.output(refined) + padded[:, :IMAGE_CHANNELS]
        return ((out + 1) / 2)[..., :height, :width]


def _init_weights(module: nn.Module) -> None:
    """The official initialisation: truncated normal (std 0.02) for convs and linears, zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
