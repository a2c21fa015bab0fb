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
* HI-Diff, as a mapping of its parts to their files (:func:`infer_parts_config`): the transformer as
  Restormer plus the prior width, token grid and single/multi-scale guidance; the latent encoders
  (width, blocks, GoPro GELU or RealBlur LeakyReLU variant, mixer expansions); the denoiser (GoPro
  mixer or RealBlur MLP). The diffusion schedule is held by no weight: the release's of the variant
  the denoiser identifies is used unless given (``{"diffusion": {"timesteps": ...}}``).

Anything else fails naming what was recognised and what did not fit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from deblur_diffusion.channels import IMAGE_CHANNELS
from deblur_diffusion.checkpoints import CheckpointError
from deblur_diffusion.models.hidiff import LATENT_ENCODER_SCALE, PRIOR_EXPANSION

# FFN expansion factors tried before one derived from the widths (int(width * factor) must give
# every level's hidden width): 2.66, the constructor default of Restormer (restormer_arch.py) and
# Swintormer (Swintormer_arch.py) that their releases use; 2, HI-Diff's RealBlur transformer
# (its RealBlur option files); the others are round values a user's variant may take.
KNOWN_FFN_FACTORS = (2.66, 2.0, 3.0, 4.0, 1.0)
LEVEL_PREFIXES = ("encoder_level1", "encoder_level2", "encoder_level3", "latent")
LEVEL_WIDTHS = (1, 2, 4, 8)
# Swintormer_arch.py's constructor default; the released option file (train_swintormer.yml) keeps it.
SWINTORMER_RELEASED_WINDOW = 16
# The order in which each release's dual-pixel network reads the views: Restormer's
# test_dual_pixel_defocus_deblur.py concatenates left then right; Swintormer's
# Dataset_DefocusDeblur_DualPixel_16bit concatenates right then left.
RELEASED_VIEWS = {"Restormer": ["l", "r"], "Swintormer": ["r", "l"]}
# The factor by which Swintormer's stem (PixelUnshuffle(2)) multiplies the input channels.
SWINTORMER_STEM_UNSHUFFLE = 4
# HI-Diff's latent encoder: its PixelUnshuffle multiplies the input channels by the square of its
# scale; stage one reads sharp + blurry, stage two (LE_DM) the blurry image.
LATENT_ENCODER_UNSHUFFLE = LATENT_ENCODER_SCALE**2
LATENT_ENCODER_STAGES = {2 * IMAGE_CHANNELS: 1, IMAGE_CHANNELS: 2}
# The diffusion of each HI-Diff release, which no weight holds. GoPro (MixerDenoiser): the paper's
# T = 8, betas linear 0.1 -> 0.99, noise prediction clamped (options/train/GoPro_S2.yml). RealBlur
# J/R (MLPDenoiser): the LDM DDPM of RealBlur_*_S2.yml, T = 16 with LDM's "linear" (scaled) betas,
# x0 prediction unclamped, textbook noising.
HIDIFF_RELEASED_DIFFUSION = {
    "gopro": {
        "timesteps": 8,
        "linear_start": 0.1,
        "linear_end": 0.99,
        "schedule": "linear",
        "prediction": "eps",
        "clip_x0": True,
        "signal_coefficient": "alphas_cumprod",
    },
    "realblur": {
        "timesteps": 16,
        "linear_start": 0.1,
        "linear_end": 0.99,
        "schedule": "scaled_linear",
        "prediction": "x0",
        "clip_x0": False,
        "signal_coefficient": "sqrt_alphas_cumprod",
    },
}


class ArchitectureError(CheckpointError):
    """The weights match no architecture this package knows."""


def _blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(match.group(1)) for key in state if (match := re.match(rf"{prefix}\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _ffn_factor(state: Mapping[str, torch.Tensor], dim: int, source: str, blocks: str) -> float:
    hidden = {
        width: state[f"{prefix}{blocks}.0.ffn.project_out.weight"].shape[1]
        for prefix, width in zip(LEVEL_PREFIXES, LEVEL_WIDTHS, strict=True)
    }
    candidates = (*KNOWN_FFN_FACTORS, hidden[8] / (8 * dim) + 1e-6)
    for factor in candidates:
        if all(int(width * dim * factor) == value for width, value in hidden.items()):
            return factor
    raise ArchitectureError(f"{source}: no FFN expansion factor gives the hidden widths {hidden} of levels of width dim x {LEVEL_WIDTHS}")


def _levels(state: Mapping[str, torch.Tensor], head_parameter: str, source: str, blocks: str = "") -> dict:
    """What Restormer, Swintormer and HI-Diff's transformer share: dim, blocks and heads per level,
    refinement, FFN, bias, LayerNorm type. ``blocks``: the path of a level's blocks under its name
    (HI-Diff's levels hold ``.blocks`` beside their HIM)."""
    counts = [_blocks(state, prefix + blocks) for prefix in LEVEL_PREFIXES]
    if 0 in counts:
        missing = [prefix + blocks for prefix, count in zip(LEVEL_PREFIXES, counts, strict=True) if not count]
        raise ArchitectureError(f"{source}: a four-level U-Net of transformer blocks, but no blocks under {missing}")
    first = f"encoder_level1{blocks}.0"
    dim = state[f"{first}.norm1.body.weight"].shape[0]
    return {
        "dim": dim,
        "num_blocks": counts,
        "num_refinement_blocks": _blocks(state, "refinement" + blocks),
        "heads": [state[f"{prefix}{blocks}.0.attn.{head_parameter}"].shape[0] for prefix in LEVEL_PREFIXES],
        "ffn_expansion_factor": _ffn_factor(state, dim, source, blocks),
        "bias": f"{first}.attn.qkv.bias" in state,
        "LayerNorm_type": "WithBias" if f"{first}.norm1.body.bias" in state else "BiasFree",
    }


def _restormer(state: Mapping[str, torch.Tensor], source: str) -> dict:
    return {
        "_target_": "deblur_diffusion.models.Restormer",
        "inp_channels": state["patch_embed.proj.weight"].shape[1],
        "out_channels": state["output.weight"].shape[0],
        **_levels(state, "temperature", source),
        "dual_pixel_task": "skip_conv.weight" in state,
    }


def _swintormer(state: Mapping[str, torch.Tensor], source: str) -> dict:
    stem_channels = state["patch_embed.proj2.weight"].shape[1]
    if stem_channels % SWINTORMER_STEM_UNSHUFFLE:
        raise ArchitectureError(f"{source}: a Swintormer stem with {stem_channels} channels, not 4 x the input channels")
    levels = _levels(state, "logit_scale", source)
    if levels["LayerNorm_type"] != "WithBias":
        raise ArchitectureError(f"{source}: a Swintormer without LayerNorm biases, which no release has")
    return {
        "_target_": "deblur_diffusion.models.Swintormer",
        "inp_channels": stem_channels // SWINTORMER_STEM_UNSHUFFLE,
        **levels,
        "window_size": SWINTORMER_RELEASED_WINDOW,
    }


# The key that identifies each architecture, and the reader of its arguments.
_ARCHITECTURES = {
    "Swintormer": ("encoder_level1.0.attn.logit_scale", _swintormer),
    "Restormer": ("encoder_level1.0.attn.temperature", _restormer),
}


def _ratio(hidden: int, width: int) -> float:
    """The expansion factor that ``int(factor * width)`` turns back into ``hidden``."""
    factor = hidden / width
    return factor if int(factor * width) == hidden else (hidden + 1e-6) / width


def _tokens(state: Mapping[str, torch.Tensor], mixer: str, source: str) -> tuple[int, float, float]:
    """The token count, and the token and channel expansions, of an MLP-mixer block ``mixer``."""
    tokens = state[f"{mixer}.patch_mixer.2.weight"].shape[0]
    width = state[f"{mixer}.norm1.weight"].shape[0]
    if math.isqrt(tokens) ** 2 != tokens:
        raise ArchitectureError(f"{source}: {tokens} prior tokens, which is no square grid (group x group)")
    return (
        tokens,
        _ratio(state[f"{mixer}.patch_mixer.0.weight"].shape[0], tokens),
        _ratio(state[f"{mixer}.channel_mixer.0.weight"].shape[0], width),
    )


def _latent_encoder(state: Mapping[str, torch.Tensor], source: str) -> dict:
    first = state["conv1.0.weight"]
    tokens, patch_expansion, channel_expansion = _tokens(state, "mlp", source)
    in_chans = first.shape[1] // LATENT_ENCODER_UNSHUFFLE
    if in_chans not in LATENT_ENCODER_STAGES:
        raise ArchitectureError(f"{source}: a latent encoder reading {in_chans} channels (HI-Diff's read 6 or 3)")
    return {
        "_target_": "deblur_diffusion.models.LatentEncoder",
        "in_chans": in_chans,
        "embed_dim": first.shape[0],
        "block_num": _blocks(state, "blocks"),
        "stage": LATENT_ENCODER_STAGES[in_chans],
        "group": math.isqrt(tokens),
        "patch_expansion": patch_expansion,
        "channel_expansion": channel_expansion,
        # The RealBlur encoder (latent_encoder_lrelu) widens its last convolution in three layers.
        "activation": "lrelu" if "conv2.0.weight" in state else "gelu",
    }


def _denoiser(state: Mapping[str, torch.Tensor], source: str) -> dict:
    if "time_mlp" in state:
        tokens, patch_expansion, channel_expansion = _tokens(state, "blocks.0.0", source)
        return {
            "_target_": "deblur_diffusion.models.MixerDenoiser",
            "in_channel": state["first_layer.0.weight"].shape[1] // 3,
            "out_channel": state["final_layer.0.weight"].shape[0],
            "inner_channel": state["first_layer.0.weight"].shape[0],
            "block_num": _blocks(state, "blocks") + 2,
            "group": math.isqrt(tokens),
            "patch_expansion": patch_expansion,
            "channel_expansion": channel_expansion,
        }
    if "resmlp.0.weight" in state:
        return {
            "_target_": "deblur_diffusion.models.MLPDenoiser",
            "n_feats": state["resmlp.0.weight"].shape[0] // PRIOR_EXPANSION,
            # resmlp.0 and its activation, then one named block per layer.
            "n_denoise_res": _blocks(state, "resmlp") - 2,
        }
    raise ArchitectureError(f"{source}: neither of HI-Diff's denoisers (MixerDenoiser: time_mlp; MLPDenoiser: resmlp.0.weight)")


def _hidiff_transformer(state: Mapping[str, torch.Tensor], source: str, group: int) -> dict:
    return {
        "_target_": "deblur_diffusion.models.PriorGuidedRestormer",
        "inp_channels": state["patch_embed.proj.weight"].shape[1],
        "out_channels": state["output.weight"].shape[0],
        **_levels(state, "temperature", source, ".blocks"),
        "dual_pixel_task": "skip_conv.weight" in state,
        "embed_dim": state["encoder_level1.him.norm2.body.weight"].shape[0] // PRIOR_EXPANSION,
        "group": group,
        # The Single-Guide ablation has no token reductions to z2 and z3.
        "multi_scale_prior": "down_1.1.weight" in state,
    }


# HI-Diff's parts (official file names), for stage two and for stage one.
HIDIFF_STAGE_TWO_PARTS = {"transformer": "net_g", "condition_encoder": "net_le_dm", "denoiser": "net_d"}
HIDIFF_STAGE_ONE_PARTS = {"transformer": "net_g", "latent_encoder": "net_le"}


def _hidiff(states: Mapping[str, Mapping[str, torch.Tensor]], sources: Mapping[str, str]) -> dict:
    encoder_part = "condition_encoder" if "condition_encoder" in states else "latent_encoder"
    try:
        encoder = _latent_encoder(states[encoder_part], sources[encoder_part])
        transformer = _hidiff_transformer(states["transformer"], sources["transformer"], encoder["group"])
        denoiser = _denoiser(states["denoiser"], sources["denoiser"]) if "denoiser" in states else None
    except KeyError as missing:
        raise ArchitectureError(f"{dict(sources)}: HI-Diff parts, but no {missing} in their weights") from missing
    prior_width = states[encoder_part]["end.0.weight"].shape[0]
    if prior_width != PRIOR_EXPANSION * transformer["embed_dim"]:
        raise ArchitectureError(
            f"{sources[encoder_part]} gives {prior_width}-wide prior tokens but {sources['transformer']} integrates "
            f"{PRIOR_EXPANSION * transformer['embed_dim']}-wide ones: not parts of one model"
        )
    if denoiser is None:
        return {"_target_": "deblur_diffusion.models.HIDiffStageOneNet", "transformer": transformer, "latent_encoder": encoder}
    variant = "gopro" if denoiser["_target_"].endswith("MixerDenoiser") else "realblur"
    return {
        "_target_": "deblur_diffusion.models.HIDiff",
        "transformer": transformer,
        "condition_encoder": encoder,
        "denoiser": denoiser,
        "diffusion": {"_target_": "deblur_diffusion.models.PriorDiffusion", **HIDIFF_RELEASED_DIFFUSION[variant]},
        "noise_seed": 0,
    }


def _merge(config: dict, overrides: Mapping, source: str, name: str) -> dict:
    """``config`` with ``overrides`` laid over it (nested mappings merged); an override that is not
    an argument of what was read fails."""
    unknown = set(overrides) - set(config)
    if unknown:
        raise ArchitectureError(f"{source}: {sorted(unknown)} are not arguments of the {name} read off its weights")
    merged = dict(config)
    for key, value in overrides.items():
        is_node = isinstance(config[key], dict) and isinstance(value, Mapping)
        merged[key] = _merge(config[key], value, source, f"{name}.{key}") if is_node else value
    return merged


def infer_parts_config(
    states: Mapping[str, Mapping[str, torch.Tensor]], sources: Mapping[str, str], overrides: Mapping | None = None
) -> dict:
    """The config of HI-Diff given as official files, one state dict per part: stage two
    (``transformer``, ``condition_encoder``, ``denoiser``) or stage one (``transformer``,
    ``latent_encoder``). The diffusion, which no weight holds, is the released one of the variant
    the denoiser identifies (:data:`HIDIFF_RELEASED_DIFFUSION`); ``overrides`` replace what was read
    (e.g. ``{"diffusion": {"timesteps": 4}}``)."""
    parts = set(states)
    if parts not in (set(HIDIFF_STAGE_TWO_PARTS), set(HIDIFF_STAGE_ONE_PARTS)):
        raise ArchitectureError(
            f"{dict(sources)}: the parts {sorted(parts)} are no model this package reads off its weights; HI-Diff "
            f"stage two is {HIDIFF_STAGE_TWO_PARTS}, stage one {HIDIFF_STAGE_ONE_PARTS}"
        )
    return _merge(_hidiff(states, sources), overrides or {}, str(dict(sources)), "HI-Diff")


def infer_network_config(state: Mapping[str, torch.Tensor], source: str, overrides: Mapping | None = None) -> dict:
    """The network config (``_target_`` and constructor arguments) of an official state dict;
    ``overrides`` replace inferred values (e.g. ``window_size``, which weights do not hold)."""
    for name, (marker, read) in _ARCHITECTURES.items():
        if marker in state:
            try:
                config = read(state, source)
            except KeyError as missing:
                raise ArchitectureError(f"{source}: looks like a {name} ({marker}) but has no {missing}") from missing
            return _merge(config, overrides or {}, source, name)
    shown = ", ".join(list(state)[:6])
    raise ArchitectureError(
        f"{source} matches no known architecture (Restormer: {_ARCHITECTURES['Restormer'][0]}, Swintormer: "
        f"{_ARCHITECTURES['Swintormer'][0]}); it holds {len(state)} tensors, e.g. {shown}. Give its config (model=...)"
    )
