"""HI-Diff's two training stages.

Stage one (:class:`HIDiffStageOne`) trains the latent encoder LE(sharp, blurry) jointly with the
prior-guided transformer under L1; validation uses the LE prior (it has the sharp image).

Stage two (:class:`HIDiffStageTwo`) starts the transformer from stage one, freezes LE and uses its
prior z as the target, and trains LE_DM, the denoiser and the transformer jointly: z_T is z noised
to step T, the whole reverse chain runs with gradients, and the loss is
``L1(output, sharp) + L1(z_hat, z)``. Validation and inference sample the prior from seeded noise.
With ``joint_training=False`` it is the paper's "Split-Training" ablation instead: the transformer
is frozen too and only LE_DM and the denoiser learn, with the noise-prediction objective (Eq. 7).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from deblur_diffusion.inference import Inference
from deblur_diffusion.models.hidiff import HIDiff, HIDiffStageOneNet, LatentEncoder
from deblur_diffusion.stages.regression import RegressionStage
from deblur_diffusion.stages.warm_start import PartWeights

PRIOR_SCOPES = ("tile", "image")


class HIDiffStageOne(RegressionStage):
    """Stage one: ``loss(transformer(blurry, LE(sharp, blurry)), sharp)``.

    The network reads the blurry and the sharp image concatenated (6 channels), so tiled
    validation cuts both alike. Other arguments as :class:`RegressionStage`.
    """

    def __init__(self, net: HIDiffStageOneNet, loss: nn.Module, optimizer: Callable[..., Optimizer], **kwargs):
        super().__init__(net, loss, optimizer, **kwargs)

    def input_channels(self, image_channels: int) -> int:
        return 2 * image_channels

    def restore(self, batch: dict) -> torch.Tensor:
        return self(torch.cat([batch["lq"], batch["gt"]], dim=1))

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        restored = self.net(torch.cat([batch["lq"], batch["gt"]], dim=1))
        return {"loss": self.loss(restored, batch["gt"])}


class HIDiffStageTwo(RegressionStage):
    """Stage two (joint training) or the Split-Training ablation.

    Args:
        net: the inference network (transformer, LE_DM, denoiser, diffusion).
        latent_encoder: stage one's LE; frozen here (no gradient, not optimised).
        stage1_ckpt: where the transformer and LE come from: a Lightning checkpoint of
            ``model=hidiff_s1``, or a mapping ``{transformer: net_g.pth, latent_encoder: net_le.pth}``
            of official release files. ``None`` starts from scratch (tests only).
        loss: the image loss (L1 in the paper).
        prior_loss_weight: weight of ``L1(z_hat, z)``.
        joint_training: False for Split-Training (transformer frozen, denoiser trained alone on the
            noise-prediction objective at a random step).
        prior_scope: under tiled inference, sample the prior per tile (``"tile"``: each tile is
            restored as the official test restores an image) or once per whole image (``"image"``:
            every tile of an image shares its prior). Whole-image inference is the same either way.
        Other arguments as :class:`RegressionStage`.
    """

    def __init__(
        self,
        net: HIDiff,
        latent_encoder: LatentEncoder,
        loss: nn.Module,
        optimizer: Callable[..., Optimizer],
        stage1_ckpt: str | Mapping[str, str] | None = None,
        prior_loss_weight: float = 1.0,
        joint_training: bool = True,
        prior_scope: str = "tile",
        inference: Inference | None = None,
        **kwargs,
    ):
        if prior_scope not in PRIOR_SCOPES:
            raise ValueError(f"prior_scope must be one of {PRIOR_SCOPES}, got {prior_scope!r}")
        if latent_encoder.stage != 1:
            raise ValueError("stage two's target prior comes from stage one's LE: latent_encoder must have stage=1")
        super().__init__(net, loss, optimizer, inference=inference, **kwargs)
        self.latent_encoder = latent_encoder.requires_grad_(False)
        if stage1_ckpt is not None:
            self.warm_start_sources = stage_one_weights(stage1_ckpt)
        if not joint_training:
            net.transformer.requires_grad_(False)
        self.prior_loss_weight = prior_loss_weight
        self.joint_training = joint_training
        self.prior_scope = prior_scope

    @staticmethod
    def modules_to_compile(net: HIDiff) -> list[nn.Module]:
        # The training step calls the parts one by one (the reverse chain loops in Python).
        return [net.transformer, net.condition_encoder, net.denoiser]

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        net = self.inference_net
        if self.prior_scope == "tile" or self.inference.mode == "whole":
            return self.inference(net, lq)
        prior = net.sample_prior(lq)

        def restore_tiles(tiles: torch.Tensor) -> torch.Tensor:
            return net(tiles, prior.repeat(tiles.shape[0] // lq.shape[0], 1, 1))

        return self.inference(restore_tiles, lq)

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        lq, gt = batch["lq"], batch["gt"]
        with torch.no_grad():
            target_prior = self.latent_encoder(lq, gt)
        condition = self.net.condition_encoder(lq)
        noise = torch.randn_like(target_prior)
        diffusion = self.net.diffusion
        if not self.joint_training:
            steps = torch.randint(0, diffusion.timesteps, (lq.shape[0],), device=lq.device)
            prediction = self.net.denoiser(diffusion.add_noise(target_prior, noise, steps), condition, steps)
            target = noise if diffusion.prediction == "eps" else target_prior
            return {"diffusion": F.mse_loss(prediction, target)}
        prior = diffusion.reverse(self.net.denoiser, condition, diffusion.noisy_start(target_prior, noise))
        restored = self.net.transformer(lq, prior)
        return {
            "image": self.loss(restored, gt),
            "prior": self.prior_loss_weight * F.l1_loss(prior, target_prior),
        }

    def inference_networks(self) -> dict[str, nn.Module]:
        net = self.inference_net
        return {"transformer": net.transformer, "condition_encoder": net.condition_encoder, "denoiser": net.denoiser}


def stage_one_weights(source: str | Mapping[str, str]) -> list[PartWeights]:
    """Where stage two's transformer and LE come from (see :class:`HIDiffStageTwo`)."""
    if isinstance(source, Mapping):
        unknown = set(source) - {"transformer", "latent_encoder"}
        if unknown or len(source) != 2:
            raise ValueError(f"stage1_ckpt as official files needs exactly the keys transformer and latent_encoder, got {sorted(source)}")
        return [PartWeights("net.transformer", str(source["transformer"])), PartWeights("latent_encoder", str(source["latent_encoder"]))]
    return [
        PartWeights("net.transformer", str(source), "net.transformer"),
        PartWeights("latent_encoder", str(source), "net.latent_encoder"),
    ]
