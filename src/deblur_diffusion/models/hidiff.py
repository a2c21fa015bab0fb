"""HI-Diff (Chen et al., "Hierarchical Integration Diffusion Model for Realistic Image Deblurring").

The pieces of the paper's Fig. 1, with the official code's constructor arguments and parameter
names (so that the released ``net_g`` / ``net_le`` / ``net_le_dm`` / ``net_d`` files load as they are):

* :class:`LatentEncoder` (Fig. 1e): image(s) -> a prior of ``group**2`` tokens x ``4 * embed_dim``
  channels. Stage one's LE reads (sharp, blurry); LE_DM reads the blurry image alone.
* :class:`PriorGuidedRestormer` (Fig. 1a, c, d): Restormer whose levels are guided by the
  multi-scale prior z1 (16 tokens), z2 (4 tokens), z3 (1 vector): a hierarchical integration
  module (:class:`HIM`, cross-attention of image tokens on prior tokens) runs once before the blocks
  of every encoder / decoder level and the refinement; the latent level instead modulates the input
  of every block's attention and FFN with ``x * Linear(z3) + Linear(z3)``.
* :class:`MixerDenoiser` (the GoPro denoising network) and :class:`MLPDenoiser` (the official
  RealBlur one), predicting the noise (or the clean prior) from ``(z_t, condition, t)``.
* :class:`PriorDiffusion`: the short beta schedule (T = 8 linear on GoPro; T = 16 LDM "linear",
  i.e. squares of a linear ramp of sqrt(beta), on RealBlur) and its deterministic reverse chain
  (posterior mean, no added noise, as the official code samples).
* :class:`HIDiffStageOneNet` and :class:`HIDiff`: the networks of stage one (prior from the sharp
  image) and of stage two / inference (prior sampled from the blurry image).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import nn

from deblur_diffusion.channels import IMAGE_CHANNELS
from deblur_diffusion.models.blocks import (
    GDFN,
    MDTA,
    FourLevelUNet,
    OverlapPatchEmbed,
    TokenLayerNorm,
    TransformerBlock,
    layer_norm_has_bias,
    pad_to_multiple,
)
from deblur_diffusion.models.interface import RestorationNetwork

PRIOR_EXPANSION = 4
LATENT_ENCODER_SCALE = 4
# Three 2x downsamplings in the transformer.
SIZE_MULTIPLE = 8
PREDICTIONS = ("eps", "x0")
# "linear": betas linear in [start, end] (official GoPro code); "scaled_linear": sqrt(beta) linear
# in [sqrt(start), sqrt(end)] (LDM's make_beta_schedule "linear", the official RealBlur code).
SCHEDULES = ("linear", "scaled_linear")
SIGNAL_COEFFICIENTS = ("alphas_cumprod", "sqrt_alphas_cumprod")

LEVEL_NAMES = FourLevelUNet.LEVEL_NAMES


class TokenMixer(nn.Module):
    """MLP-Mixer block on (B, tokens, channels): token mixing, then channel mixing, each pre-norm
    and residual (the official ``MLP``)."""

    def __init__(self, num_patches: int, embed_dims: int, patch_expansion: float, channel_expansion: float):
        super().__init__()
        patch_hidden = int(patch_expansion * num_patches)
        channel_hidden = int(channel_expansion * embed_dims)
        self.patch_mixer = nn.Sequential(nn.Linear(num_patches, patch_hidden), nn.GELU(), nn.Linear(patch_hidden, num_patches))
        self.channel_mixer = nn.Sequential(nn.Linear(embed_dims, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, embed_dims))
        self.norm1 = nn.LayerNorm(embed_dims)
        self.norm2 = nn.LayerNorm(embed_dims)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.patch_mixer(self.norm1(tokens).transpose(1, 2)).transpose(1, 2)
        return tokens + self.channel_mixer(self.norm2(tokens))


class LatentEncoder(nn.Module):
    """Compresses image(s) into ``group**2`` prior tokens of ``4 * embed_dim`` channels (Fig. 1e).

    PixelUnshuffle(4) -> conv3x3 + act -> ``block_num`` residual blocks (conv-act-conv) -> conv ->
    adaptive average pool to a ``group x group`` grid -> one MLP-mixer block -> Linear to the prior
    width + act. ``stage=1`` reads concat(sharp, blurry) (6 channels), ``stage=2`` the blurry image.

    ``activation="gelu"`` is the official GoPro encoder; ``"lrelu"`` the RealBlur one, which also
    widens the last conv to ``4 * embed_dim`` channels before pooling and mixes at that width.
    """

    def __init__(
        self,
        in_chans: int = 6,
        embed_dim: int = 64,
        block_num: int = 6,
        stage: int = 1,
        group: int = 4,
        patch_expansion: float = 0.5,
        channel_expansion: float = 4,
        activation: str = "gelu",
    ):
        super().__init__()
        expected_channels = {1: 2 * IMAGE_CHANNELS, 2: IMAGE_CHANNELS}
        if expected_channels.get(stage) != in_chans:
            raise ValueError(
                f"LatentEncoder reads sharp + blurry (stage 1, in_chans=6) or blurry (stage 2, in_chans=3); "
                f"got stage={stage}, in_chans={in_chans}"
            )
        if activation not in ("gelu", "lrelu"):
            raise ValueError(f"LatentEncoder activation must be 'gelu' or 'lrelu', got {activation!r}")
        self.stage = stage
        self.pixel_unshuffle = nn.PixelUnshuffle(LATENT_ENCODER_SCALE)

        def act() -> nn.Module:
            return nn.GELU() if activation == "gelu" else nn.LeakyReLU(0.1, inplace=True)

        self.conv1 = nn.Sequential(nn.Conv2d(in_chans * LATENT_ENCODER_SCALE**2, embed_dim, 3, padding=1), act())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(embed_dim, embed_dim, 3, padding=1), act(), nn.Conv2d(embed_dim, embed_dim, 3, padding=1))
            for _ in range(block_num)
        )
        prior_dim = PRIOR_EXPANSION * embed_dim
        if activation == "gelu":
            self.conv2 = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
            mixer_dim = embed_dim
        else:
            self.conv2 = nn.Sequential(
                nn.Conv2d(embed_dim, embed_dim * 2, 3, padding=1),
                act(),
                nn.Conv2d(embed_dim * 2, embed_dim * 2, 3, padding=1),
                act(),
                nn.Conv2d(embed_dim * 2, prior_dim, 3, padding=1),
                act(),
            )
            mixer_dim = prior_dim
        self.pool = nn.AdaptiveAvgPool2d((group, group))
        self.mlp = TokenMixer(group * group, mixer_dim, patch_expansion, channel_expansion)
        self.end = nn.Sequential(nn.Linear(mixer_dim, prior_dim), act())

    def forward(self, blurry: torch.Tensor, sharp: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) blurry [and sharp for stage 1] -> (B, group**2, 4 * embed_dim)."""
        if (sharp is None) != (self.stage == 2):
            raise ValueError(
                f"a stage-{self.stage} LatentEncoder needs {'blurry and sharp' if self.stage == 1 else 'the blurry image only'}"
            )
        x = blurry if sharp is None else torch.cat([sharp, blurry], dim=1)
        x, _ = pad_to_multiple(x, LATENT_ENCODER_SCALE)
        x = self.conv1(self.pixel_unshuffle(x))
        for block in self.blocks:
            x = block(x) + x
        tokens = rearrange(self.pool(self.conv2(x)), "b c h w -> b (h w) c")
        return self.end(self.mlp(tokens))


class HIM(nn.Module):
    """Hierarchical integration module (Fig. 1d): image tokens attend to the prior tokens.

    LayerNorm on both, q from the image, k and v from the prior (no bias), multi-head softmax
    attention with scale head_dim^-0.5 (``F.scaled_dot_product_attention``'s default), a projection
    with bias, and a residual.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool, prior_dim: int, layer_norm_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = TokenLayerNorm(dim, layer_norm_bias)
        self.norm2 = TokenLayerNorm(prior_dim, layer_norm_bias)
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(prior_dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = rearrange(x, "b c h w -> b (h w) c")
        q = rearrange(self.q(self.norm1(tokens)), "b n (head c) -> b head n c", head=self.num_heads)
        k, v = (rearrange(t, "b n (head c) -> b head n c", head=self.num_heads) for t in self.kv(self.norm2(prior)).chunk(2, dim=-1))
        attended = rearrange(F.scaled_dot_product_attention(q, k, v), "b head n c -> b n (head c)")
        return rearrange(tokens + self.proj(attended), "b (h w) c -> b c h w", h=height, w=width)


def _modulate(x: torch.Tensor, prior: torch.Tensor, scale: nn.Linear, shift: nn.Linear) -> torch.Tensor:
    return x * scale(prior)[..., None, None] + shift(prior)[..., None, None]


class ModulatedMDTA(MDTA):
    """MDTA whose input is modulated by the prior vector: ``x * ln1(z3) + ln2(z3)``."""

    def __init__(self, dim: int, num_heads: int, bias: bool, prior_dim: int):
        super().__init__(dim, num_heads, bias)
        self.ln1 = nn.Linear(prior_dim, dim)
        self.ln2 = nn.Linear(prior_dim, dim)

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return super().forward(_modulate(x, prior, self.ln1, self.ln2))


class ModulatedGDFN(GDFN):
    """GDFN whose input is modulated by the prior vector: ``x * ln1(z3) + ln2(z3)``."""

    def __init__(self, dim: int, expansion_factor: float, bias: bool, prior_dim: int):
        super().__init__(dim, expansion_factor, bias)
        self.ln1 = nn.Linear(prior_dim, dim)
        self.ln2 = nn.Linear(prior_dim, dim)

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return super().forward(_modulate(x, prior, self.ln1, self.ln2))


class ModulatedTransformerBlock(TransformerBlock):
    """Restormer block with prior-modulated attention and FFN (HI-Diff's latent level)."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layer_norm_bias: bool, prior_dim: int):
        super().__init__(dim, num_heads, ffn_expansion_factor, bias, layer_norm_bias)
        self.attn = ModulatedMDTA(dim, num_heads, bias, prior_dim)
        self.ffn = ModulatedGDFN(dim, ffn_expansion_factor, bias, prior_dim)

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), prior)
        return x + self.ffn(self.norm2(x), prior)


class IntegratedLevel(nn.Module):
    """One level guided through a HIM: ``blocks(HIM(x, prior tokens))``."""

    def __init__(self, blocks: Sequence[nn.Module], him: HIM):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.him = him

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        x = self.him(x, prior)
        for block in self.blocks:
            x = block(x)
        return x


class ModulatedLevel(nn.Module):
    """One level whose every block is modulated by the prior vector."""

    def __init__(self, blocks: Sequence[ModulatedTransformerBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, prior)
        return x


class PriorGuidedRestormer(FourLevelUNet):
    """HI-Diff's Transformer (official ``Transformer`` arguments and parameter names).

    ``forward(image, prior)`` with ``prior`` of shape (B, group**2, 4 * embed_dim). With
    ``multi_scale_prior=True`` (HI-Diff) the prior is reduced to z2 (group**2 / 4 tokens) and z3
    (one vector) by linear maps over tokens then channels (``down_1``, ``down_2``); levels 1 and the
    refinement integrate z1, levels 2 and 3 integrate z2, and the latent level is modulated by z3.
    ``multi_scale_prior=False`` is the paper's "Single-Guide" ablation: z1 = z2 = z3 = z, so every
    level, the latent one included, integrates the whole prior through a HIM.

    Any input size is accepted (reflect-padded to a multiple of 8, cropped back).
    ``checkpoint_levels`` (level names) recompute those levels' activations in the backward pass.
    """

    official_files: ClassVar[dict[str, str]] = {"": "net_g"}

    def __init__(
        self,
        inp_channels: int = 3,
        out_channels: int = 3,
        dim: int = 48,
        num_blocks: Sequence[int] = (3, 5, 6, 6),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        LayerNorm_type: str = "WithBias",
        dual_pixel_task: bool = False,
        embed_dim: int = 64,
        group: int = 4,
        multi_scale_prior: bool = True,
        checkpoint_levels: Sequence[str] = (),
    ):
        super().__init__()
        if group < 2 or group % 2:
            raise ValueError(f"group (the side of the prior's token grid) must be even and >= 2, got {group}")
        self.input_channels = inp_channels
        self.out_channels = out_channels
        self.dual_pixel_task = dual_pixel_task
        self.multi_scale_prior = multi_scale_prior
        self.set_checkpoint_levels(checkpoint_levels)
        self.num_tokens = group * group
        self.prior_dim = PRIOR_EXPANSION * embed_dim
        ln_bias = layer_norm_has_bias(LayerNorm_type)

        if multi_scale_prior:
            self.down_1 = self._token_reduction(self.num_tokens, self.num_tokens // 4)
            self.down_2 = self._token_reduction(self.num_tokens // 4, 1)

        def stage(width: int, n_heads: int, depth: int) -> nn.Module:
            return IntegratedLevel(
                [TransformerBlock(width, n_heads, ffn_expansion_factor, bias, ln_bias) for _ in range(depth)],
                HIM(width, n_heads, bias, self.prior_dim, ln_bias),
            )

        def latent_stage(width: int, n_heads: int, depth: int) -> nn.Module:
            return ModulatedLevel(
                [ModulatedTransformerBlock(width, n_heads, ffn_expansion_factor, bias, ln_bias, self.prior_dim) for _ in range(depth)]
            )

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.build_levels(stage, dim, num_blocks, num_refinement_blocks, heads, bias, latent_stage if multi_scale_prior else None)
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def _token_reduction(self, tokens_in: int, tokens_out: int) -> nn.Sequential:
        return nn.Sequential(
            Rearrange("b n c -> b c n"),
            nn.Linear(tokens_in, tokens_out),
            Rearrange("b c n -> b n c"),
            nn.Linear(self.prior_dim, self.prior_dim),
        )

    def level_priors(self, prior: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prior each level receives (z1, z2, z3 of Fig. 1c, or z everywhere)."""
        if not self.multi_scale_prior:
            return dict.fromkeys(LEVEL_NAMES, prior)
        z2 = self.down_1(prior)
        z3 = self.down_2(z2).flatten(1)
        z1_levels = ("encoder_level1", "decoder_level1", "refinement")
        z2_levels = ("encoder_level2", "encoder_level3", "decoder_level3", "decoder_level2")
        return {**dict.fromkeys(z1_levels, prior), **dict.fromkeys(z2_levels, z2), "latent": z3}

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"PriorGuidedRestormer expects a (B, {self.input_channels}, H, W) image, got {tuple(x.shape)}")
        expected = (x.shape[0], self.num_tokens, self.prior_dim)
        if tuple(prior.shape) != expected:
            raise ValueError(f"PriorGuidedRestormer expects a prior of shape {expected}, got {tuple(prior.shape)}")
        padded, (height, width) = pad_to_multiple(x, SIZE_MULTIPLE)
        stem = self.patch_embed(padded)
        refined = self.encode_decode(stem, self.level_priors(prior))
        out = self.output(refined + self.skip_conv(stem)) if self.dual_pixel_task else self.output(refined) + padded[:, : self.out_channels]
        return out[..., :height, :width]


class MixerDenoiser(nn.Module):
    """The official GoPro denoising network (``denoising``): predicts the noise in z_t.

    concat[z_t, time, condition] over channels -> Linear + LeakyReLU(0.2) -> (block_num - 2) x
    (MLP-mixer block + GELU) -> Linear + GELU. ``time`` is (t + 1) broadcast to z_t's shape times a
    learned scalar (initialised 1e-3).
    """

    def __init__(
        self,
        in_channel: int = 256,
        out_channel: int = 256,
        inner_channel: int = 512,
        block_num: int = 4,
        layerscale_value: float = 1e-3,
        group: int = 4,
        patch_expansion: float = 0.5,
        channel_expansion: float = 2,
    ):
        super().__init__()
        self.time_mlp = nn.Parameter(layerscale_value * torch.ones(1))
        self.first_layer = nn.Sequential(nn.Linear(in_channel * 3, inner_channel), nn.LeakyReLU(0.2, inplace=True))
        self.blocks = nn.ModuleList(
            nn.Sequential(TokenMixer(group * group, inner_channel, patch_expansion, channel_expansion), nn.GELU())
            for _ in range(block_num - 2)
        )
        self.final_layer = nn.Sequential(nn.Linear(inner_channel, out_channel), nn.GELU())

    def forward(self, z_t: torch.Tensor, condition: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """z_t, condition: (B, N, C); step: (B,) 0-based step indices."""
        time = (step + 1).to(z_t.dtype)[:, None, None].expand_as(z_t) * self.time_mlp
        x = self.first_layer(torch.cat([z_t, time, condition], dim=-1))
        for block in self.blocks:
            x = block(x)
        return self.final_layer(x)


class MLPDenoiser(nn.Module):
    """The official RealBlur denoising network (``simple_denoise``), used with x0 prediction.

    concat[condition, t / (10 * timesteps), z_t] -> Linear + LeakyReLU(0.1) -> ``n_denoise_res`` x
    (Linear + LeakyReLU(0.1)); the last layer ends in the activation too. ``t`` is the 0-based step
    index; ``timesteps`` only scales it (the official option files leave it at its default, 5, so
    the max period is 50 whatever the schedule's length).
    """

    def __init__(self, n_feats: int = 64, n_denoise_res: int = 4, timesteps: int = 5):
        super().__init__()
        self.max_period = timesteps * 10
        width = PRIOR_EXPANSION * n_feats
        layers = [nn.Linear(width * 2 + 1, width), nn.LeakyReLU(0.1, inplace=True)]
        layers += [_LinearLeakyReLU(width) for _ in range(n_denoise_res)]
        self.resmlp = nn.Sequential(*layers)

    def forward(self, z_t: torch.Tensor, condition: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        # A division (not a product with 1 / max_period) to round as the official code does.
        time = (step.to(z_t.dtype) / self.max_period)[:, None, None].expand(*z_t.shape[:2], 1)
        return self.resmlp(torch.cat([condition, time, z_t], dim=-1))


class _LinearLeakyReLU(nn.Module):
    """``resmlp.N.resmlp`` in the official checkpoints (named residual, but not one)."""

    def __init__(self, width: int):
        super().__init__()
        self.resmlp = nn.Sequential(nn.Linear(width, width), nn.LeakyReLU(0.1, inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resmlp(x)


def linear_betas(timesteps: int, linear_start: float, linear_end: float, schedule: str = "linear") -> np.ndarray:
    """``timesteps`` betas from ``linear_start`` to ``linear_end`` (float64; changing T
    re-interpolates the same range): evenly spaced (``"linear"``), or the squares of evenly spaced
    square roots (``"scaled_linear"``, LDM's "linear")."""
    if timesteps < 1:
        raise ValueError(f"the diffusion needs at least one step, got timesteps={timesteps}")
    if not 0 < linear_start <= linear_end < 1:
        raise ValueError(f"betas must satisfy 0 < linear_start <= linear_end < 1, got {linear_start}, {linear_end}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "linear":
        return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64)
    return np.linspace(np.sqrt(linear_start), np.sqrt(linear_end), timesteps, dtype=np.float64) ** 2


class PriorDiffusion(nn.Module):
    """The latent diffusion of the prior: a short beta schedule and its reverse chain.

    ``schedule="linear"`` spaces the betas evenly (official GoPro code); ``"scaled_linear"`` spaces
    their square roots evenly (LDM's default "linear", used by the official RealBlur code).

    Each reverse step predicts z0 (from the noise, or directly with ``prediction="x0"``), clamps it
    to [-1, 1] if ``clip_x0``, and moves to the posterior mean ``coef1 * z0 + coef2 * z_t`` without
    adding noise, as the official code does both in training and at test time.

    ``signal_coefficient`` is how :meth:`noisy_start` mixes the clean prior with noise at step T for
    joint training: the official GoPro code scales z by alpha-bar_T (``"alphas_cumprod"``, the
    default), the textbook q(z_T | z_0) and the official RealBlur (LDM) code by its square root
    (with sqrt(1 - alpha-bar_T) on the noise, both computed in float64 as LDM's buffers).
    The schedule is derived from the arguments (in float64, stored as float32), so its buffers are
    not saved in checkpoints.
    """

    def __init__(
        self,
        timesteps: int = 8,
        linear_start: float = 0.1,
        linear_end: float = 0.99,
        prediction: str = "eps",
        clip_x0: bool = True,
        signal_coefficient: str = "alphas_cumprod",
        schedule: str = "linear",
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if signal_coefficient not in SIGNAL_COEFFICIENTS:
            raise ValueError(f"signal_coefficient must be one of {SIGNAL_COEFFICIENTS}, got {signal_coefficient!r}")
        self.timesteps = timesteps
        self.prediction = prediction
        self.clip_x0 = clip_x0
        self.signal_coefficient = signal_coefficient
        self.schedule = schedule
        betas = linear_betas(timesteps, linear_start, linear_end, schedule)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        for name, values in buffers.items():
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """q(z_t | z_0) = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise, per sample (step: (B,))."""
        abar = self.alphas_cumprod[step][:, None, None]
        return abar.sqrt() * z0 + (1.0 - abar).sqrt() * noise

    def noisy_start(self, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_T from the clean prior, where joint training starts the reverse chain."""
        if self.signal_coefficient == "sqrt_alphas_cumprod":
            return self.sqrt_alphas_cumprod[-1] * z0 + self.sqrt_one_minus_alphas_cumprod[-1] * noise
        abar = self.alphas_cumprod[-1]
        return abar * z0 + (1.0 - abar**2).sqrt() * noise

    def predict_x0(self, z_t: torch.Tensor, model_output: torch.Tensor, step: int) -> torch.Tensor:
        if self.prediction == "x0":
            z0 = model_output
        else:
            z0 = self.sqrt_recip_alphas_cumprod[step] * z_t - self.sqrt_recipm1_alphas_cumprod[step] * model_output
        return z0.clamp(-1.0, 1.0) if self.clip_x0 else z0

    def reverse(self, denoiser: nn.Module, condition: torch.Tensor, z_t: torch.Tensor, trajectory: list | None = None) -> torch.Tensor:
        """Runs the T reverse steps from ``z_t`` (= z_T); differentiable. When ``trajectory`` is a
        list, z_T and each step's result are appended to it (for plots of the reverse process).

        The chain runs in float32 even under mixed precision: at step T, x0 = sqrt(1/abar) z_t -
        sqrt(1/abar - 1) eps multiplies the prediction by ~174 (T = 8), which would turn bf16
        rounding into errors of order 1. The denoiser is a small MLP, so this costs little."""
        device_type = z_t.device.type
        full_precision = (
            torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else contextlib.nullcontext()
        )
        with full_precision:
            z_t, condition = z_t.float(), condition.float()
            if trajectory is not None:
                trajectory.append(z_t)
            for step in reversed(range(self.timesteps)):
                steps = torch.full((z_t.shape[0],), step, device=z_t.device, dtype=torch.long)
                z0 = self.predict_x0(z_t, denoiser(z_t, condition, steps), step)
                z_t = self.posterior_mean_coef1[step] * z0 + self.posterior_mean_coef2[step] * z_t
                if trajectory is not None:
                    trajectory.append(z_t)
        return z_t


class HIDiffStageOneNet(RestorationNetwork):
    """Stage one: the transformer guided by LE(sharp, blurry).

    Its input is the blurry image with the sharp one concatenated after it, (B, 6, H, W), so that
    whole-image and tiled inference cut both alike.
    """

    needs_sharp_input = True
    official_files: ClassVar[dict[str, str]] = {"transformer": "net_g", "latent_encoder": "net_le"}

    def __init__(self, transformer: PriorGuidedRestormer, latent_encoder: LatentEncoder):
        super().__init__()
        self.transformer = transformer
        self.latent_encoder = latent_encoder
        self.input_channels = transformer.input_channels

    def forward(self, blurry_and_sharp: torch.Tensor) -> torch.Tensor:
        blurry, sharp = blurry_and_sharp.split(IMAGE_CHANNELS, dim=1)
        padded_blurry, (height, width) = pad_to_multiple(blurry, SIZE_MULTIPLE)
        padded_sharp, _ = pad_to_multiple(sharp, SIZE_MULTIPLE)
        restored = self.transformer(padded_blurry, self.latent_encoder(padded_blurry, padded_sharp))
        return restored[..., :height, :width]


class HIDiff(RestorationNetwork):
    """Stage two and inference: LE_DM(blurry) conditions the reverse chain, whose prior guides the
    transformer.

    Args:
        transformer: the prior-guided Restormer.
        condition_encoder: LE_DM, the stage-two latent encoder of the blurry image.
        denoiser: the network of the reverse steps.
        diffusion: the schedule and the reverse chain.
        noise_seed: the reverse chain starts from z_T drawn once from this seed and shared by every
            image (and tile) of a call, so that results do not depend on batch size, tiling or
            devices; ``None`` draws fresh noise per image from the global generator (official).
    """

    official_files: ClassVar[dict[str, str]] = {"transformer": "net_g", "condition_encoder": "net_le_dm", "denoiser": "net_d"}
    samples_noise = True

    def __init__(
        self,
        transformer: PriorGuidedRestormer,
        condition_encoder: LatentEncoder,
        denoiser: nn.Module,
        diffusion: PriorDiffusion,
        noise_seed: int | None = 0,
    ):
        super().__init__()
        self.input_channels = transformer.input_channels
        if condition_encoder.stage != 2:
            raise ValueError("HI-Diff's condition encoder (LE_DM) must be a stage-2 LatentEncoder (blurry input only)")
        self.transformer = transformer
        self.condition_encoder = condition_encoder
        self.denoiser = denoiser
        self.diffusion = diffusion
        self.noise_seed = noise_seed

    def start_noise(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        shape = (self.transformer.num_tokens, self.transformer.prior_dim)
        if self.noise_seed is None:
            return torch.randn(batch_size, *shape, device=device, dtype=dtype)
        generator = torch.Generator().manual_seed(self.noise_seed)
        noise = torch.randn(1, *shape, generator=generator).to(device=device, dtype=dtype)
        return repeat(noise, "1 n c -> b n c", b=batch_size)

    def sample_prior(self, blurry: torch.Tensor, noise: torch.Tensor | None = None, trajectory: list | None = None) -> torch.Tensor:
        """The predicted prior z-hat (B, N, C) of a blurry batch (any size)."""
        padded, _ = pad_to_multiple(blurry, SIZE_MULTIPLE)
        condition = self.condition_encoder(padded)
        if noise is None:
            noise = self.start_noise(blurry.shape[0], blurry.device, condition.dtype)
        return self.diffusion.reverse(self.denoiser, condition, noise, trajectory)

    def forward(self, blurry: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Restores a blurry batch; samples the prior unless one is given."""
        if prior is None:
            prior = self.sample_prior(blurry)
        return self.transformer(blurry, prior)
