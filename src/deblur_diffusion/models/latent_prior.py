"""Swintormer's diffusion prior: a conditional latent diffusion model (the LDM super-resolution
design of Rombach et al.) that turns a blurry image into a sharp-looking prior image.

* the VQ autoencoder (``diffusers.VQModel``) maps images in [-1, 1] to latents ``f`` times smaller
  (f = 4 for three resolution levels);
* the denoiser (``diffusers.UNet2DModel``) predicts the noise in a latent with the blurry image,
  area-downsampled to the latent size, concatenated as condition (LDM's "concat" conditioning);
* training noises latents with the DDPM schedule (1000 steps, betas from 0.0015 to 0.0155 on a
  square-root scale, what the LDM code calls "linear"), sampling runs DDIM with T steps;
* the prior is ``decode(sample(blurry))``, an RGB image of the input's size in [0, 1], which the
  paper concatenates to Swintormer's input (:class:`PriorFusedNet`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel, VQModel
from einops import repeat
from torch import nn

from deblur_diffusion.models.blocks import pad_to_multiple

IMAGE_CHANNELS = 3


def to_model_range(image: torch.Tensor) -> torch.Tensor:
    return image * 2 - 1


def to_image_range(values: torch.Tensor) -> torch.Tensor:
    return (values + 1) / 2


class LatentPriorModel(nn.Module):
    """VQ autoencoder + conditional UNet + their noise schedule.

    Args:
        autoencoder: the VQ autoencoder (its latent channels are the UNet's output channels).
        unet: the denoiser; reads ``latent_channels + 3`` channels (latent, then the condition).
        num_train_timesteps, beta_start, beta_end, beta_schedule: the DDPM schedule
            (``scaled_linear`` is the LDM code's "linear": linear in sqrt(beta)).
        sampling_steps: T, the number of DDIM steps of :meth:`sample_latents`.
        eta: DDIM's stochasticity (1.0 as the official generation script; 0 is deterministic).
        noise_seed: sampling draws its noise from this seed, so a given image always gets the
            same prior; the starting latent is shared by the images of a batch. ``None`` uses the
            global generator.
    """

    def __init__(
        self,
        autoencoder: VQModel,
        unet: UNet2DModel,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0015,
        beta_end: float = 0.0155,
        beta_schedule: str = "scaled_linear",
        sampling_steps: int = 50,
        eta: float = 1.0,
        noise_seed: int | None = 0,
    ):
        super().__init__()
        latent_channels = autoencoder.config.latent_channels
        if unet.config.in_channels != latent_channels + IMAGE_CHANNELS or unet.config.out_channels != latent_channels:
            raise ValueError(
                f"the UNet must read {latent_channels + IMAGE_CHANNELS} channels (latent + blurry image) and predict "
                f"{latent_channels}; got in_channels={unet.config.in_channels}, out_channels={unet.config.out_channels}"
            )
        self.autoencoder = autoencoder
        self.unet = unet
        schedule = dict(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule
        )
        self.training_schedule = DDPMScheduler(**schedule, clip_sample=False)
        self.sampler = DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        self.sampling_steps = sampling_steps
        self.eta = eta
        self.noise_seed = noise_seed
        self.downsample = 2 ** (len(autoencoder.config.block_out_channels) - 1)
        self.size_multiple = self.downsample * 2 ** (len(unet.config.block_out_channels) - 1)

    def condition(self, blurry: torch.Tensor) -> torch.Tensor:
        """The blurry image in [-1, 1], area-downsampled to the latent size."""
        return F.avg_pool2d(to_model_range(blurry[:, :IMAGE_CHANNELS]), self.downsample)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Latents (before quantisation) of an image in [0, 1]."""
        return self.autoencoder.encode(to_model_range(image)).latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The image in [0, 1] of latents (quantised to the codebook first)."""
        return to_image_range(self.autoencoder.decode(latents).sample)

    def reconstruct(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction in [0, 1], codebook + commitment loss) of an image in [0, 1] of any size."""
        padded, (height, width) = pad_to_multiple(image, self.downsample)
        decoded = self.autoencoder.decode(self.encode(padded))
        return to_image_range(decoded.sample)[..., :height, :width], decoded.commit_loss.mean()

    def noise_prediction_loss(self, sharp: torch.Tensor, blurry: torch.Tensor) -> torch.Tensor:
        """The LDM objective: MSE between the noise added to the sharp image's latents at a random
        step and the UNet's prediction of it, conditioned on the blurry image."""
        with torch.no_grad():
            latents = self.encode(sharp)
        noise = torch.randn_like(latents)
        steps = torch.randint(0, self.training_schedule.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.training_schedule.add_noise(latents, noise, steps)
        prediction = self.unet(torch.cat([noisy, self.condition(blurry)], dim=1), steps).sample
        return F.mse_loss(prediction, noise)

    def _generator(self) -> torch.Generator | None:
        return None if self.noise_seed is None else torch.Generator().manual_seed(self.noise_seed)

    @torch.no_grad()
    def sample_latents(self, blurry: torch.Tensor, steps: int | None = None, trajectory: list | None = None) -> torch.Tensor:
        """DDIM sampling of the latents of a blurry batch whose sides are multiples of
        ``size_multiple``. ``trajectory``, when a list, receives the latent after every step."""
        condition = self.condition(blurry)
        batch, _, height, width = condition.shape
        generator = self._generator()
        shape = (1, self.autoencoder.config.latent_channels, height, width)
        latents = repeat(torch.randn(shape, generator=generator), "1 c h w -> b c h w", b=batch)
        latents = latents.to(device=blurry.device, dtype=blurry.dtype)
        self.sampler.set_timesteps(steps or self.sampling_steps)
        for step in self.sampler.timesteps:
            timestep = step.to(blurry.device).expand(batch)
            predicted_noise = self.unet(torch.cat([latents, condition], dim=1), timestep).sample
            latents = self.sampler.step(predicted_noise, step, latents, eta=self.eta, generator=generator).prev_sample
            if trajectory is not None:
                trajectory.append(latents)
        return latents

    def generate(self, blurry: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """``decode(sample(blurry))`` for a blurry batch of any size (first three channels read),
        unclamped; sampling runs without gradients, decoding with them (for fine-tuning it)."""
        padded, (height, width) = pad_to_multiple(blurry[:, :IMAGE_CHANNELS], self.size_multiple)
        return self.decode(self.sample_latents(padded, steps))[..., :height, :width]

    def forward(self, blurry: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """The prior image in [0, 1] of a blurry batch of any size."""
        return self.generate(blurry, steps).clamp(0.0, 1.0)


class PriorFusedNet(nn.Module):
    """A restoration network fed with the image and its diffusion prior, computed on the fly by a
    frozen :class:`LatentPriorModel` (the "online" mode, for datasets too small to precompute).

    ``forward(x)`` runs ``net(concat(x, prior(x)))``: with a 3-channel blurry image the network
    reads 6 channels, with dual-pixel views (6) it reads 9.
    """

    def __init__(self, prior: LatentPriorModel, net: nn.Module):
        super().__init__()
        self.prior = prior.requires_grad_(False)
        self.net = net

    @property
    def inp_channels(self) -> int:
        return self.net.inp_channels - IMAGE_CHANNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            prior = self.prior(x)
        return self.net(torch.cat([x, prior], dim=1))
