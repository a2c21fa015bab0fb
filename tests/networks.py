"""Tiny configurations of every network, as Hydra configs (``_target_``), for tests that need a
network that runs in milliseconds; ``tiny_network(name)`` builds one."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

TINY_UNET = {"dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 1, 1]}
TINY_TRANSFORMER = {"_target_": "deblur_diffusion.models.PriorGuidedRestormer", **TINY_UNET, "embed_dim": 8}
TINY_ENCODER = {"_target_": "deblur_diffusion.models.LatentEncoder", "embed_dim": 8, "block_num": 1}
TINY_DENOISER = {
    "_target_": "deblur_diffusion.models.MixerDenoiser",
    "in_channel": 32,
    "out_channel": 32,
    "inner_channel": 16,
    "block_num": 1,
}

TINY_CONFIGS = {
    "restormer": {"_target_": "deblur_diffusion.models.Restormer", **TINY_UNET},
    "restormer_dual_pixel": {"_target_": "deblur_diffusion.models.Restormer", **TINY_UNET, "inp_channels": 6, "dual_pixel_task": True},
    "swintormer": {"_target_": "deblur_diffusion.models.Swintormer", **TINY_UNET, "inp_channels": 6, "window_size": 4},
    "swintormer_with_prior": {"_target_": "deblur_diffusion.models.Swintormer", **TINY_UNET, "inp_channels": 9, "window_size": 4},
    "hidiff_transformer": TINY_TRANSFORMER,
    "hidiff_stage_one": {
        "_target_": "deblur_diffusion.models.HIDiffStageOneNet",
        "transformer": TINY_TRANSFORMER,
        "latent_encoder": {**TINY_ENCODER, "stage": 1, "in_chans": 6},
    },
    "hidiff": {
        "_target_": "deblur_diffusion.models.HIDiff",
        "transformer": TINY_TRANSFORMER,
        "condition_encoder": {**TINY_ENCODER, "stage": 2, "in_chans": 3},
        "denoiser": TINY_DENOISER,
        "diffusion": {"_target_": "deblur_diffusion.models.PriorDiffusion", "timesteps": 4},
    },
}
# Networks built from levels of blocks (activation checkpointing applies to them).
LEVELLED = ("restormer", "restormer_dual_pixel", "swintormer", "swintormer_with_prior", "hidiff_transformer")


def tiny_overrides(name: str, prefix: str = "model.net") -> list[str]:
    """The tiny configuration as command-line overrides of a model config's network (channels and
    target left to the model and data configs)."""
    config = {key: value for key, value in TINY_CONFIGS[name].items() if key not in ("_target_", "inp_channels")}
    return [f"{prefix}.{key}={value}".replace(" ", "") for key, value in config.items()]


def tiny_network(name: str, **overrides) -> torch.nn.Module:
    return instantiate(OmegaConf.create({**TINY_CONFIGS[name], **overrides}), _convert_="all")


def tiny_inputs(name: str, network: torch.nn.Module, height: int, width: int) -> tuple[torch.Tensor, ...]:
    """A batch of two for the network's forward (the transformer alone also takes its prior tokens)."""
    generator = torch.Generator().manual_seed(0)
    channels = network.input_channels + (3 if network.needs_sharp_input else 0)
    image = torch.rand(2, channels, height, width, generator=generator)
    if name == "hidiff_transformer":
        return image, torch.randn(2, network.num_tokens, network.prior_dim, generator=generator)
    return (image,)


def prior_fused_swintormer_overrides(data_dir, prior_dir) -> list[str]:
    """``train`` overrides for a tiny Swintormer fed with precomputed priors, on a synthesized GoPro."""
    return [
        "model=swintormer",
        *tiny_overrides("swintormer"),
        "data=gopro",
        f"paths.data_dir={data_dir}",
        f"data.prior_dir={prior_dir}",
        "data.patch_schedule=[[0,32,2]]",
        "data.num_workers=0",
    ]


def official_hidiff_config(kwargs: dict, timesteps: int) -> dict:
    """The stage-two HI-Diff config of an official parity fixture's constructor arguments (its
    ``config.json`` kwargs of ``net_g``, ``net_le_dm`` and ``net_d``)."""
    return {
        "_target_": "deblur_diffusion.models.HIDiff",
        "transformer": {"_target_": "deblur_diffusion.models.PriorGuidedRestormer", **kwargs["net_g"]},
        "condition_encoder": {"_target_": "deblur_diffusion.models.LatentEncoder", **kwargs["net_le_dm"]},
        "denoiser": {"_target_": "deblur_diffusion.models.MixerDenoiser", **kwargs["net_d"]},
        "diffusion": {"_target_": "deblur_diffusion.models.PriorDiffusion", "timesteps": timesteps},
    }
