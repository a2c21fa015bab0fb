"""The training stages of Swintormer's diffusion prior, chained by checkpoint paths.

1. :class:`AutoencoderStage` (``model=ldm_autoencoder``): the VQ autoencoder on sharp images
   (reconstruction loss + codebook and commitment losses).
2. :class:`LatentDiffusionStage` (``model=ldm_prior``): the conditional UNet on the noise-prediction
   objective, the autoencoder frozen.
3. :class:`DecoderFinetuneStage` (``model=ldm_decoder_finetune``, the paper's stage): the encoder and
   the UNet frozen, the decoder trained so that ``decode(sample(blurry))`` matches the sharp image.

Each validates the image it produces against the sharp one: the reconstruction (stage 1) or the
sampled prior (stages 2 and 3). :class:`PriorFusedStage` trains a restoration network on the
image and an online prior from a frozen model of stage 3.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DModel, VQModel
from torch import nn
from torch.optim import Optimizer

from deblur_diffusion.checkpoints import CheckpointError, lightning_weights, load_weights
from deblur_diffusion.models.latent_prior import LatentPriorModel, PriorFusedNet
from deblur_diffusion.stages.regression import RegressionStage

LDM_PARTS = ("autoencoder", "unet")
DECODER_PARTS = ("autoencoder.decoder", "autoencoder.post_quant_conv")


def load_diffusers_folder(folder: str | Path, net: LatentPriorModel) -> None:
    """Loads a diffusers-format LDM folder (``vqvae/`` and ``unet/``, as the LDM super-resolution
    release ``CompVis/ldm-super-resolution-4x-openimages``) into ``net``."""
    folder = Path(folder)
    layout = f"{folder}/vqvae/{{config.json, diffusion_pytorch_model.safetensors}} and {folder}/unet/{{...}}"
    if not (folder / "vqvae" / "config.json").is_file() or not (folder / "unet" / "config.json").is_file():
        raise CheckpointError(
            f"no diffusers-format LDM weights in {folder}: expected {layout}. Download "
            "CompVis/ldm-super-resolution-4x-openimages (git clone of its Hugging Face repository) on a machine with "
            "internet and copy the folder here. An original CompVis model.ckpt must first be converted with "
            "diffusers' scripts/convert_ldm_original_checkpoint_to_diffusers.py."
        )
    load_weights(net.autoencoder, VQModel.from_pretrained(folder, subfolder="vqvae").state_dict(), f"{folder}/vqvae")
    load_weights(net.unet, UNet2DModel.from_pretrained(folder, subfolder="unet").state_dict(), f"{folder}/unet")


class LatentPriorStage(RegressionStage):
    """What the three stages share: initial weights, frozen parts, and a network that is the whole
    :class:`LatentPriorModel` (so each checkpoint holds everything the next stage needs).

    Args:
        net: the latent diffusion model.
        init_ckpt: the previous stage's Lightning checkpoint (its ``inherited_parts`` are loaded).
        pretrained_dir: a diffusers-format LDM folder to start from instead (autoencoder and UNet).
        Other arguments as :class:`RegressionStage`.
    """

    trained_parts: tuple[str, ...] = ()
    inherited_parts: tuple[str, ...] = ()

    def __init__(
        self,
        net: LatentPriorModel,
        loss: nn.Module,
        optimizer: Callable[..., Optimizer],
        init_ckpt: str | None = None,
        pretrained_dir: str | None = None,
        **kwargs,
    ):
        if pretrained_dir is not None:
            load_diffusers_folder(pretrained_dir, net)
        if init_ckpt is not None:
            for part in self.inherited_parts:
                load_weights(net.get_submodule(part), lightning_weights(init_ckpt, f"net.{part}"), f"{init_ckpt} (net.{part})")
        net.requires_grad_(False)
        for part in self.trained_parts:
            net.get_submodule(part).requires_grad_(True)
        super().__init__(net, loss, optimizer, **kwargs)


class AutoencoderStage(LatentPriorStage):
    """Stage 1: the VQ autoencoder reconstructs sharp images; ``codebook_weight`` scales the VQ
    codebook + commitment loss."""

    trained_parts = ("autoencoder",)

    def __init__(self, *args, codebook_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.codebook_weight = codebook_weight

    def restore(self, batch: dict) -> torch.Tensor:
        return self.inference_net.reconstruct(batch["gt"])[0]

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        reconstruction, codebook = self.net.reconstruct(batch["gt"])
        return {"reconstruction": self.loss(reconstruction, batch["gt"]), "codebook": self.codebook_weight * codebook}


class LatentDiffusionStage(LatentPriorStage):
    """Stage 2: the UNet learns to predict the noise of sharp latents given the blurry image."""

    trained_parts = ("unet",)
    inherited_parts = ("autoencoder",)

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.net.noise_prediction_loss(batch["gt"], batch["lq"])}


class DecoderFinetuneStage(LatentPriorStage):
    """Stage 3 (the paper's): only the decoder learns, on ``loss(decode(sample(blurry)), sharp)``
    with T-step sampling; the encoder, codebook and UNet get no gradient and keep their weights."""

    trained_parts = DECODER_PARTS
    inherited_parts = LDM_PARTS

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.loss(self.net.generate(batch["lq"]), batch["gt"])}


class PriorFusedStage(RegressionStage):
    """A restoration network trained on the image and its online diffusion prior.

    Args:
        net: a :class:`PriorFusedNet` (frozen prior model + restoration network).
        prior_ckpt: a checkpoint of ``model=ldm_decoder_finetune`` whose model computes the prior.
        Other arguments as :class:`RegressionStage`.
    """

    def __init__(self, net: PriorFusedNet, loss: nn.Module, optimizer: Callable[..., Optimizer], prior_ckpt: str | None = None, **kwargs):
        if prior_ckpt is not None:
            load_weights(net.prior, lightning_weights(prior_ckpt, "net"), f"{prior_ckpt} (net)")
        super().__init__(net, loss, optimizer, **kwargs)
