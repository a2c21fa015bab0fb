"""Building blocks shared by Restormer, HI-Diff and Swintormer.

Parameter names follow the official Restormer code so that the released checkpoints load without
renaming (``norm1.body.weight``, ``attn.qkv_dwconv``, ``ffn.project_in``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from deblur_diffusion.models.interface import RestorationNetwork


class TokenLayerNorm(nn.Module):
    """LayerNorm over the last dimension (tokens x channels), with Restormer's two variants.

    ``with_bias=True`` is the usual LayerNorm. ``with_bias=False`` is Restormer's "BiasFree"
    variant: it divides by the standard deviation but does not subtract the mean, so it is not
    ``F.layer_norm`` and is computed by hand.
    """

    def __init__(self, channels: int, with_bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.body = _LayerNormParams(channels, with_bias)
        self.eps = eps

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.body.bias is not None:
            return F.layer_norm(tokens, tokens.shape[-1:], self.body.weight, self.body.bias, self.eps)
        variance = tokens.var(dim=-1, keepdim=True, unbiased=False)
        return tokens * torch.rsqrt(variance + self.eps) * self.body.weight


class ChannelLayerNorm(TokenLayerNorm):
    """The same LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _LayerNormParams(nn.Module):
    """Holds the affine parameters under ``body.`` as the official checkpoints name them."""

    def __init__(self, channels: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.register_parameter("bias", nn.Parameter(torch.zeros(channels)) if with_bias else None)


def layer_norm_has_bias(layer_norm_type: str) -> bool:
    """Maps the official ``LayerNorm_type`` strings to a flag."""
    if layer_norm_type == "WithBias":
        return True
    if layer_norm_type == "BiasFree":
        return False
    raise ValueError(f"LayerNorm_type must be 'WithBias' or 'BiasFree', got {layer_norm_type!r}")


# How MDTA computes its channel attention: "sdpa" (PyTorch's fused kernels) or "matmul" (q k^T,
# softmax, @ v, as the official code writes it). The head dimension is H x W pixels, which flash
# kernels do not take, so which is faster depends on the device: benchmarks/gpu_check.py times both.
CHANNEL_ATTENTION_FORMS = ("sdpa", "matmul")


class MDTA(nn.Module):
    """Multi-Dconv head Transposed Attention: attention across channels, linear in pixels.

    q and k are L2-normalised along the pixels, so their products are cosines scaled by a learned
    per-head temperature; that scale is folded into q so that the product itself runs through
    ``F.scaled_dot_product_attention`` with ``scale=1`` (``attention="sdpa"``), or through an
    explicit matmul and softmax (``"matmul"``, the official code's form; the same function,
    :func:`set_channel_attention` switches a whole network).
    """

    attention = "sdpa"

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (rearrange(t, "b (head c) h w -> b head c (h w)", head=self.num_heads) for t in (q, k, v))
        q = F.normalize(q, dim=-1) * self.temperature
        k = F.normalize(k, dim=-1)
        if self.attention == "matmul":
            out = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        out = rearrange(out, "b head c (h w) -> b (head c) h w", h=height, w=width)
        return self.project_out(out)


def set_channel_attention(network: nn.Module, form: str) -> nn.Module:
    """Sets how every MDTA of ``network`` computes its attention (``CHANNEL_ATTENTION_FORMS``)."""
    if form not in CHANNEL_ATTENTION_FORMS:
        raise ValueError(f"the channel attention is one of {CHANNEL_ATTENTION_FORMS}, got {form!r}")
    for module in network.modules():
        if isinstance(module, MDTA):
            module.attention = form
    return network


class GDFN(nn.Module):
    """Gated-Dconv Feed-forward Network: GELU(dwconv branch) gates the other branch."""

    def __init__(self, dim: int, expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class TransformerBlock(nn.Module):
    """Restormer block: x + MDTA(LN(x)), then x + GDFN(LN(x))."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layer_norm_bias: bool):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, layer_norm_bias)
        self.attn = MDTA(dim, num_heads, bias)
        self.norm2 = ChannelLayerNorm(dim, layer_norm_bias)
        self.ffn = GDFN(dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """3x3 convolution from image channels to features (patches overlap through the kernel)."""

    def __init__(self, in_channels: int, dim: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halves the resolution and doubles the channels: conv to C/2, then pixel-unshuffle by 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Doubles the resolution and halves the channels: conv to 2C, then pixel-shuffle by 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def pad_bottom_right(x: torch.Tensor, pad_h: int, pad_w: int, mode: str = "reflect") -> torch.Tensor:
    """Pads the bottom and right of an NCHW tensor. Reflection needs each pad to be smaller than
    its side, so a side shorter than its pad is padded by replicating its last row or column."""
    if pad_h == 0 and pad_w == 0:
        return x
    if mode != "reflect":
        return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    rows = _reflected_indices(x.shape[-2], pad_h, x.device)
    columns = _reflected_indices(x.shape[-1], pad_w, x.device)
    return x.index_select(-2, rows).index_select(-1, columns)


def _reflected_indices(length: int, pad: int, device: torch.device) -> torch.Tensor:
    """The source index of each position of a side of ``length`` padded by ``pad`` at its end:
    reflected when ``pad < length``, else the last index repeated. Written with tensor arithmetic and
    no branch on the sizes, so that one exported graph (ONNX) pads every size as PyTorch does."""
    positions = torch.arange(length + pad, device=device)
    total = torch.ones_like(positions).sum()
    reflected = torch.where(total < 2 * length, 2 * (length - 1) - positions, length - 1)
    return torch.where(positions < length, positions, reflected)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pads the bottom and right of ``x`` so that H and W are multiples of ``multiple``.

    Returns the padded tensor and the original (H, W) to crop back to.
    """
    height, width = x.shape[-2:]
    return pad_bottom_right(x, (-height) % multiple, (-width) % multiple, mode), (height, width)


class FourLevelUNet(RestorationNetwork):
    """The 4-level encoder-decoder that Restormer and Swintormer share (official attribute names).

    Channels double and resolution halves at each level. The decoder concatenates the encoder
    features; it reduces channels with a 1x1 conv at levels 3 and 2 but keeps 2*dim at level 1, and
    a refinement stage follows at that width. Subclasses provide the stem and the head;
    ``make_stage(width, heads, depth)`` builds the blocks of one level (``make_latent_stage``, when
    given, those of the latent level).
    """

    LEVELS = 4
    LEVEL_NAMES = (
        "encoder_level1",
        "encoder_level2",
        "encoder_level3",
        "latent",
        "decoder_level3",
        "decoder_level2",
        "decoder_level1",
        "refinement",
    )
    checkpoint_levels: frozenset[str] = frozenset()

    def set_checkpoint_levels(self, levels: Sequence[str]) -> None:
        """Levels whose activations are recomputed in the backward pass instead of stored
        (activation checkpointing: less memory, about one more forward pass of time)."""
        unknown = set(levels) - set(self.LEVEL_NAMES)
        if unknown:
            raise ValueError(f"unknown checkpoint_levels {sorted(unknown)}; levels are {list(self.LEVEL_NAMES)}")
        self.checkpoint_levels = frozenset(levels)

    def build_levels(
        self,
        make_stage,
        dim: int,
        num_blocks: Sequence[int],
        num_refinement_blocks: int,
        heads: Sequence[int],
        bias: bool,
        make_latent_stage=None,
    ) -> None:
        if len(num_blocks) != self.LEVELS or len(heads) != self.LEVELS:
            raise ValueError(f"num_blocks and heads need {self.LEVELS} entries, got {list(num_blocks)} and {list(heads)}")
        self.encoder_level1 = make_stage(dim, heads[0], num_blocks[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = make_stage(dim * 2, heads[1], num_blocks[1])
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = make_stage(dim * 4, heads[2], num_blocks[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = (make_latent_stage or make_stage)(dim * 8, heads[3], num_blocks[3])

        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = make_stage(dim * 4, heads[2], num_blocks[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level2 = make_stage(dim * 2, heads[1], num_blocks[1])
        self.up2_1 = Upsample(dim * 2)
        self.decoder_level1 = make_stage(dim * 2, heads[0], num_blocks[0])
        self.refinement = make_stage(dim * 2, heads[0], num_refinement_blocks)

    def run_level(self, name: str, x: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Runs one level's blocks, with that level's prior when the model has one."""
        level = getattr(self, name)
        inputs = (x,) if prior is None else (x, prior)
        if name in self.checkpoint_levels and self.training and torch.is_grad_enabled():
            return checkpoint(level, *inputs, use_reentrant=False)
        return level(*inputs)

    def encode_decode(self, stem: torch.Tensor, level_priors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Stem features (B, dim, h, w) to refined features (B, 2*dim, h, w).

        ``level_priors`` maps level names to the prior each level receives (HI-Diff).
        """
        priors = level_priors or {}

        def run(name: str, x: torch.Tensor) -> torch.Tensor:
            return self.run_level(name, x, priors.get(name))

        enc1 = run("encoder_level1", stem)
        enc2 = run("encoder_level2", self.down1_2(enc1))
        enc3 = run("encoder_level3", self.down2_3(enc2))
        latent = run("latent", self.down3_4(enc3))
        dec3 = run("decoder_level3", self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], dim=1)))
        dec2 = run("decoder_level2", self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], dim=1)))
        dec1 = run("decoder_level1", torch.cat([self.up2_1(dec2), enc1], dim=1))
        return run("refinement", dec1)
