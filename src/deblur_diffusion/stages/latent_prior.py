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

import torch
from einops import rearrange
from torch import nn
from torch.optim import Optimizer

from deblur_diffusion.models.blocks import pad_to_multiple
from deblur_diffusion.models.latent_prior import LatentPriorModel, PriorFusedNet, to_model_range
from deblur_diffusion.stages.regression import RegressionStage
from deblur_diffusion.stages.warm_start import PartWeights

LDM_PARTS = ("autoencoder", "unet")
# The subfolders of a diffusers LDM folder that hold each part.
DIFFUSERS_FOLDERS = {"autoencoder": "vqvae", "unet": "unet"}
DECODER_PARTS = ("autoencoder.decoder", "autoencoder.post_quant_conv")


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

    # What the training step runs (through encode / decode / the UNet, not LatentPriorModel.forward).
    compiled_parts: tuple[str, ...] = ()

    @classmethod
    def modules_to_compile(cls, net: LatentPriorModel) -> list[nn.Module]:
        return [net.get_submodule(part) for part in cls.compiled_parts]

    def __init__(
        self,
        net: LatentPriorModel,
        loss: nn.Module,
        optimizer: Callable[..., Optimizer],
        init_ckpt: str | None = None,
        pretrained_dir: str | None = None,
        **kwargs,
    ):
        net.requires_grad_(False)
        for part in self.trained_parts:
            net.get_submodule(part).requires_grad_(True)
        super().__init__(net, loss, optimizer, **kwargs)
        if pretrained_dir is not None:
            self.warm_start_sources += [PartWeights(f"net.{part}", str(pretrained_dir), key) for part, key in DIFFUSERS_FOLDERS.items()]
        if init_ckpt is not None:
            self.warm_start_sources += [PartWeights(f"net.{part}", str(init_ckpt), f"net.{part}") for part in self.inherited_parts]


class AutoencoderStage(LatentPriorStage):
    """Stage 1: the VQ autoencoder reconstructs sharp images; ``codebook_weight`` scales the VQ
    codebook + commitment loss.

    ``codebook_from_data`` (used only when training from scratch) replaces the codebook, before
    the first step, by encoder outputs of the first batch. The default initialisation draws codes
    near zero, far from the encoder's outputs, so every latent snaps to the same few codes, the
    commitment loss pulls the encoder onto them and the decoder learns a constant image.
    """

    trained_parts = ("autoencoder",)
    inherited_parts = ("autoencoder",)
    compiled_parts = ("autoencoder.encoder", "autoencoder.decoder")

    def __init__(
        self,
        net: LatentPriorModel,
        loss: nn.Module,
        optimizer: Callable[..., Optimizer],
        codebook_weight: float = 1.0,
        codebook_from_data: bool = True,
        init_ckpt: str | None = None,
        pretrained_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(net, loss, optimizer, init_ckpt=init_ckpt, pretrained_dir=pretrained_dir, **kwargs)
        self.codebook_weight = codebook_weight
        self.codebook_from_data = codebook_from_data and init_ckpt is None and pretrained_dir is None

    def on_train_start(self) -> None:
        if not self.codebook_from_data or self.global_step > 0:
            return
        batch = next(iter(self.trainer.train_dataloader))
        sharp = batch["gt"].to(self.device)
        with torch.no_grad():
            latents = self.net.encode(to_model_range(pad_to_multiple(sharp, self.net.downsample)[0]))
        vectors = rearrange(latents, "b c h w -> (b h w) c")
        codebook = self.net.autoencoder.quantize.embedding.weight
        picks = torch.randint(vectors.shape[0], (codebook.shape[0],), generator=torch.Generator().manual_seed(0))
        # Every rank must start from the same codebook, whatever its own first batch.
        codes = self.trainer.strategy.broadcast(vectors[picks.to(vectors.device)].cpu(), src=0)
        with torch.no_grad():
            codebook.copy_(codes.to(codebook))

    def restore(self, batch: dict) -> torch.Tensor:
        return self.inference_net.reconstruct(batch["gt"])[0]

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        reconstruction, codebook = self.net.reconstruct(batch["gt"])
        return {"reconstruction": self.loss(reconstruction, batch["gt"]), "codebook": self.codebook_weight * codebook}


class LatentDiffusionStage(LatentPriorStage):
    """Stage 2: the UNet learns to predict the noise of sharp latents given the blurry image."""

    trained_parts = ("unet",)
    inherited_parts = ("autoencoder",)
    compiled_parts = ("autoencoder.encoder", "unet")

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.net.noise_prediction_loss(batch["gt"], batch["lq"])}


class DecoderFinetuneStage(LatentPriorStage):
    """Stage 3 (the paper's): only the decoder learns, on ``loss(decode(sample(blurry)), sharp)``
    with T-step sampling; the encoder, codebook and UNet get no gradient and keep their weights."""

    trained_parts = DECODER_PARTS
    inherited_parts = LDM_PARTS
    compiled_parts = ("unet", "autoencoder.decoder")

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.loss(self.net.generate(batch["lq"]), batch["gt"])}


class PriorFusedStage(RegressionStage):
    """A restoration network trained on the image and its online diffusion prior.

    Args:
        net: a :class:`PriorFusedNet` (frozen prior model + restoration network).
        prior_ckpt: where the prior model's weights come from: a checkpoint of
            ``model=ldm_decoder_finetune``, or with ``prior_ldm_config`` the released CompVis
            LDM-BSR ``model.ckpt`` (its EMA weights, into the configured architecture, which must be
            the released one: ``model/ldm_net=official``).
        prior_ldm_config: the CompVis ``config.yaml`` that goes with ``prior_ckpt``.
        Other arguments as :class:`RegressionStage`.
    """

    # The EMA averages the restoration network only: the prior model is frozen (~169 M parameters
    # for the released LDM-BSR), and a copy of it would double every checkpoint.
    ema_part = "net"
    init_part = "net.net"

    @property
    def inference_net(self) -> nn.Module:
        if self.ema is None:
            return self.net
        return PriorFusedNet(self.net.prior, self.ema.module)

    @staticmethod
    def modules_to_compile(net: PriorFusedNet) -> list[nn.Module]:
        # The restoration network, and the prior's UNet and decoder inside its sampling loop.
        return [net.net, net.prior.unet, net.prior.autoencoder.decoder]

    def __init__(
        self,
        net: PriorFusedNet,
        loss: nn.Module,
        optimizer: Callable[..., Optimizer],
        prior_ckpt: str | None = None,
        prior_ldm_config: str | None = None,
        **kwargs,
    ):
        super().__init__(net, loss, optimizer, **kwargs)
        if prior_ckpt is not None:
            key = "" if prior_ldm_config is not None else "net"
            self.warm_start_sources = [PartWeights("net.prior", str(prior_ckpt), key, prior_ldm_config)]
