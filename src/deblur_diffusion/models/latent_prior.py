"""Swintormer's diffusion prior: a conditional latent diffusion model (the LDM super-resolution
design of Rombach et al.) that turns a blurry image into a prior concatenated to Swintormer's input.

* the VQ autoencoder (``diffusers.VQModel``) maps images in [-1, 1] to latents ``f`` times smaller
  (f = 4 for three resolution levels);
* the denoiser (``diffusers.UNet2DModel``) predicts the noise in a latent with a condition image
  concatenated to it (LDM's "concat" conditioning);
* the noise schedule has 1000 steps, betas from 0.0015 to 0.0155 on a square-root scale (what the
  LDM code calls "linear"); sampling runs DDIM with T steps.

Two priors (``prior``):

* ``"official"`` (the released ``generate_feature.py``, the default): the pretrained LDM-BSR model
  conditioned on the blurry image at **full resolution** in [-1, 1]; a latent of the image's own
  size is sampled with DDIM (eta 1, T steps, a seed) and used raw, clamped to [-1, 1] and mapped to
  [0, 1]; it is not decoded. The condition is reflect-padded to a multiple of 128 and sampled
  through LDM's split-input path (128 px tiles every 64 px, blended at every step).
* ``"paper_decoder"`` (the paper text): the condition area-downsampled to the latent size, the
  sampled latent decoded into an RGB image of the input's size, with a decoder fine-tuned for it
  (``model=ldm_decoder_finetune``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel, VQModel
from torch import nn

from deblur_diffusion.channels import IMAGE_CHANNELS
from deblur_diffusion.models.blocks import pad_to_multiple
from deblur_diffusion.models.interface import RestorationNetwork

PRIORS = ("official", "paper_decoder")
# The seed of the released generate_feature.py: the default of every sampled prior (generate_prior
# and predict's seed: null), so that a prior sampled in predict is the one generate_prior wrote.
RELEASED_PRIOR_SEED = 42


def prior_seed(seed: int | None) -> int:
    """The seed a prior is sampled from: ``seed``, or the released script's when None."""
    return RELEASED_PRIOR_SEED if seed is None else int(seed)


# generate_feature.py's split_input_params: 128 px latent tiles every 64 px, clipped border weights.
OFFICIAL_SPLIT_INPUT = {"ks": (128, 128), "stride": (64, 64), "clip_min_weight": 0.01, "clip_max_weight": 0.5}


def to_model_range(image: torch.Tensor) -> torch.Tensor:
    return image * 2 - 1


def sqrt_linear_alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """alpha-bar of LDM's "linear" schedule (linear in sqrt(beta), diffusers' ``scaled_linear``) as
    LatentDiffusion registers it: computed in float64, then cast (diffusers' float32 one is ~6e-7 off)."""
    # NumPy's linspace, as ldm/modules/diffusionmodules/util.py make_beta_schedule.
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32, device="cpu")  # a table, also under a meta-device context


def to_image_range(values: torch.Tensor) -> torch.Tensor:
    return (values + 1) / 2


class LatentPriorModel(RestorationNetwork):
    """VQ autoencoder + conditional UNet + their noise schedule.

    ``released_parameters``: the parameter counts of the released LDM-BSR model (``model_ema`` UNet
    and VQ first stage of ``ldm/bsr_sr/model.ckpt``), which ``model/ldm_net=official`` reproduces.

    Args:
        autoencoder: the VQ autoencoder (its latent channels are the UNet's output channels).
        unet: the denoiser; reads ``latent_channels + 3`` channels (latent, then the condition).
        num_train_timesteps: the number of steps of the training (DDPM) schedule.
        beta_start: its first beta.
        beta_end: its last beta.
        beta_schedule: how betas go from ``beta_start`` to ``beta_end`` (``scaled_linear`` is the
            LDM code's "linear": linear in sqrt(beta)).
        sampling_steps: T, the DDIM steps of the prior (:meth:`forward`) when none are given.
        eta: DDIM's stochasticity (1.0 as the official generation script; 0 is deterministic).
        noise_seed: sampling draws its noise from this seed, so a given image always gets the
            same prior. The images of a batch share every draw (the starting latent, as the
            official script, and each step's noise), so an image's prior depends on the batch it is
            sampled in only by float32 rounding. ``None`` uses the global generator.
        alphas_cumprod: the schedule's alpha-bar; by default, for ``scaled_linear``, as the LDM code
            registers it (:func:`sqrt_linear_alphas_cumprod`), so that a model built from its config
            (a resumed run) samples as the loaded release does.
        scale_factor: LDM's latent scale (1 for LDM-BSR).
        prior: ``"official"`` or ``"paper_decoder"`` (see the module docstring): what ``forward`` returns.
        split_input: LDM's split-input settings for the official prior (latent tiles ``ks`` every
            ``stride``, weights clipped to [clip_min_weight, clip_max_weight]).
        condition_multiple: the official prior pads the condition to a multiple of this (128).
    """

    samples_noise = True
    released_parameters: ClassVar[dict[str, int]] = {"autoencoder": 55_322_782, "unet": 113_622_563}

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
        alphas_cumprod: torch.Tensor | None = None,
        scale_factor: float = 1.0,
        prior: str = "official",
        split_input: dict | None = None,
        condition_multiple: int = 128,
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
        # One scheduler is the noise schedule of training and the DDIM sampler of both priors. With
        # steps_offset 1, 'leading' spacing and alpha-bar[0] after the last step it runs LDM's DDIMSampler
        # (timesteps range(0, 1000, 1000 // T) + 1, set by _set_timesteps for any T); its alpha-bar is
        # replaced by LDM's float64 one.
        self.scheduler = DDIMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing="leading",
        )
        if alphas_cumprod is None and beta_schedule == "scaled_linear":
            alphas_cumprod = sqrt_linear_alphas_cumprod(num_train_timesteps, beta_start, beta_end)
        if alphas_cumprod is not None:
            self.scheduler.alphas_cumprod = alphas_cumprod.float().cpu()
            self.scheduler.final_alpha_cumprod = self.scheduler.alphas_cumprod[0]
        self.sampling_steps = sampling_steps
        self.eta = eta
        self.noise_seed = noise_seed
        self.scale_factor = scale_factor
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        self.prior = prior
        self.split_input = dict(split_input or OFFICIAL_SPLIT_INPUT)
        self.condition_multiple = condition_multiple
        self.unet_multiple = 2 ** (len(unet.config.block_out_channels) - 1)
        self.downsample = 2 ** (len(autoencoder.config.block_out_channels) - 1)
        self.size_multiple = self.downsample * 2 ** (len(unet.config.block_out_channels) - 1)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha-bar of the training schedule, the one both training and sampling use."""
        return self.scheduler.alphas_cumprod

    def condition(self, blurry: torch.Tensor) -> torch.Tensor:
        """The blurry image in [-1, 1], area-downsampled to the latent size."""
        return F.avg_pool2d(to_model_range(blurry[:, :IMAGE_CHANNELS]), self.downsample)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Latents before quantisation (LDM encode_first_stage: quant_conv(encoder(x)), times
        scale_factor) of an image in [-1, 1]."""
        return self.scale_factor * self.autoencoder.encode(image).latents

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents snapped to the codebook (straight-through form z + (z_q - z))."""
        return self.autoencoder.quantize(latents / self.scale_factor)[0] * self.scale_factor

    def decode(self, latents: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """The image in [-1, 1] of latents, quantised to the codebook first (LDM decode_first_stage)."""
        return self.autoencoder.decode(latents / self.scale_factor, force_not_quantize=force_not_quantize).sample

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """eps(x_t, t) given the condition (at the latent's size, in [-1, 1]), concatenated after x_t."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        return self.unet(torch.cat([x_t, condition], dim=1), t).sample

    def reconstruct(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction in [0, 1], codebook + commitment loss) of an image in [0, 1] of any size."""
        padded, (height, width) = pad_to_multiple(image, self.downsample)
        decoded = self.autoencoder.decode(self.autoencoder.encode(to_model_range(padded)).latents)
        return to_image_range(decoded.sample)[..., :height, :width], decoded.commit_loss.mean()

    def noise_prediction_loss(self, sharp: torch.Tensor, blurry: torch.Tensor) -> torch.Tensor:
        """The LDM objective: MSE between the noise added to the sharp image's latents at a random
        step and the UNet's prediction of it, conditioned on the blurry image."""
        with torch.no_grad():
            latents = self.encode(to_model_range(sharp))
        noise = torch.randn_like(latents)
        steps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, steps)
        prediction = self.unet(torch.cat([noisy, self.condition(blurry)], dim=1), steps).sample
        return F.mse_loss(prediction, noise)

    def _generator(self) -> torch.Generator | None:
        return None if self.noise_seed is None else torch.Generator().manual_seed(self.noise_seed)

    @staticmethod
    def _shared_noise(batch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One draw of a single image's noise (on the CPU generator), for every image of ``batch``:
        with one image it is the draw the official sampler makes."""
        return torch.randn((1, *batch.shape[1:]), generator=generator).to(batch).expand_as(batch)

    def sample_latents(self, blurry: torch.Tensor, steps: int | None = None, trajectory: list | None = None) -> torch.Tensor:
        """The paper's prior latents: :meth:`sample` conditioned on the blurry batch (sides multiples of
        ``size_multiple``) area-downsampled to the latent size."""
        steps = steps or self.sampling_steps
        return self.sample(self.condition(blurry), steps, self.eta, generator=self._generator(), trajectory=trajectory)

    def _set_timesteps(self, steps: int) -> None:
        """LDM DDIMSampler's 'uniform' timesteps, range(0, T_train, T_train // steps) + 1 descending,
        on the CPU with the alpha-bar table (which ``add_noise`` may have moved to a GPU). When
        ``steps`` does not divide T_train that is more than ``steps`` of them, as in LDM; each still
        moves down by T_train // steps, as the scheduler's ``step`` computes the previous timestep."""
        self.scheduler.set_timesteps(steps)
        stride = self.scheduler.config.num_train_timesteps // steps
        self.scheduler.timesteps = torch.arange(0, self.scheduler.config.num_train_timesteps, stride).flip(0) + 1
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.cpu()
        self.scheduler.final_alpha_cumprod = self.scheduler.final_alpha_cumprod.cpu()

    def ddim_schedule(self, steps: int, eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What :meth:`sample` runs with ``steps``, in LDM DDIMSampler's terms: its timesteps
        (ascending), alpha-bar there, the alpha-bar each step moves to (alpha-bar[0] after the last)
        and each step's noise scale sigma."""
        self._set_timesteps(steps)
        descending = self.scheduler.timesteps
        previous = descending - self.scheduler.config.num_train_timesteps // steps
        alphas_prev = [self.alphas_cumprod[p] if p >= 0 else self.scheduler.final_alpha_cumprod for p in previous]
        sigmas = [eta * self.scheduler._get_variance(t, p).sqrt() for t, p in zip(descending, previous, strict=True)]
        return descending.flip(0), self.alphas_cumprod[descending].flip(0), torch.stack(alphas_prev).flip(0), torch.stack(sigmas).flip(0)

    def _tiled_noise(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor, tiles: dict) -> torch.Tensor:
        """LDM apply_model with split_input_params: the UNet on overlapping (ks, stride) tiles of the
        latent and the condition, blended with clipped distance-to-border weights."""
        (kh, kw), (sh, sw) = tiles["ks"], tiles["stride"]
        height, width = x_t.shape[-2:]
        if (height - kh) % sh or (width - kw) % sw or height < kh or width < kw:
            raise ValueError(f"tiles {kh}x{kw} with stride {sh}x{sw} do not cover a {height}x{width} latent")
        fold_args = dict(kernel_size=(kh, kw), stride=(sh, sw))
        count = ((height - kh) // sh + 1) * ((width - kw) // sw + 1)
        y = torch.arange(kh, dtype=torch.float32)[:, None].expand(kh, kw) / (kh - 1)
        x = torch.arange(kw, dtype=torch.float32)[None, :].expand(kh, kw) / (kw - 1)
        border = torch.minimum(torch.minimum(y, x), torch.minimum(1 - y, 1 - x))
        weight = border.clip(tiles["clip_min_weight"], tiles["clip_max_weight"]).to(x_t)
        weight = weight.reshape(1, kh * kw, 1).expand(1, kh * kw, count)
        normalization = F.fold(weight, (height, width), **fold_args)
        batch = x_t.shape[0]
        x_tiles = F.unfold(x_t, **fold_args).view(batch, -1, kh, kw, count)
        c_tiles = F.unfold(condition, **fold_args).view(batch, -1, kh, kw, count)
        outputs = torch.stack([self.predict_noise(x_tiles[..., i], t, c_tiles[..., i]) for i in range(count)], dim=-1)
        outputs = outputs * weight.view(1, 1, kh, kw, count)
        return F.fold(outputs.view(batch, -1, count), (height, width), **fold_args) / normalization

    @torch.no_grad()
    def sample(
        self,
        condition: torch.Tensor,
        steps: int,
        eta: float = 1.0,
        x_T: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        tiles: dict | None = None,
        trajectory: list | None = None,
    ) -> torch.Tensor:
        """DDIM sampling as LDM's DDIMSampler.sample (eps prediction, x0 not clipped): the final
        latent, not decoded. ``condition`` (B, 3, H, W) in [-1, 1] has the latent's size; ``x_T``
        defaults to one (1, C, H, W) draw shared by the batch, as is each step's noise; ``tiles`` as
        LDM's split_input_params (ks, stride, clip_min_weight, clip_max_weight) runs the UNet on
        blended tiles. ``trajectory``, when a list, receives the latent after every step."""
        batch, _, height, width = condition.shape
        if x_T is None:
            x_T = torch.randn((1, self.unet.config.out_channels, height, width), generator=generator)
        latents = x_T.to(condition).expand(batch, -1, -1, -1).clone()
        self._set_timesteps(steps)
        for step in self.scheduler.timesteps:
            timestep = step.to(condition.device).expand(batch)
            if tiles is None:
                eps = self.predict_noise(latents, timestep, condition)
            else:
                eps = self._tiled_noise(latents, timestep, condition, tiles)
            step_noise = self._shared_noise(latents, generator) if eta > 0 else None
            latents = self.scheduler.step(eps, step, latents, eta=eta, variance_noise=step_noise).prev_sample
            if trajectory is not None:
                trajectory.append(latents)
        return latents

    def generate(self, blurry: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """``decode(sample(blurry))`` for a blurry batch of any size (first three channels read),
        unclamped; sampling runs without gradients, decoding with them (for fine-tuning it)."""
        padded, (height, width) = pad_to_multiple(blurry[:, :IMAGE_CHANNELS], self.size_multiple)
        return to_image_range(self.decode(self.sample_latents(padded, steps)))[..., :height, :width]

    def official_prior(self, blurry: torch.Tensor, steps: int | None = None, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """The released code's prior of a blurry batch in [0, 1] of any size: the raw latent sampled
        at the image's size with the blurry image as condition, clamped and mapped to [0, 1].

        As ``generate_feature.py``: the condition is reflect-padded to a multiple of
        ``condition_multiple`` (128; a constant -1 where reflection cannot reach, as its fallback
        pads zeros before mapping to [-1, 1]) and always sampled through LDM's split-input path
        (one tile when the padded image is no larger than a tile), then cropped back."""
        condition = to_model_range(blurry[:, :IMAGE_CHANNELS])
        height, width = condition.shape[-2:]
        multiple = math.lcm(self.unet_multiple, self.condition_multiple)
        pad = (0, (-width) % multiple, 0, (-height) % multiple)
        reflectable = pad[1] < width and pad[3] < height
        padded = F.pad(condition, pad, mode="reflect") if reflectable else F.pad(condition, pad, value=-1.0)
        tile_height, tile_width = self.split_input["ks"]
        tiles = self.split_input | {"ks": (min(tile_height, padded.shape[-2]), min(tile_width, padded.shape[-1]))}
        latent = self.sample(padded, steps or self.sampling_steps, self.eta, x_T=x_T, generator=self._generator(), tiles=tiles)
        return to_image_range(latent.clamp(-1.0, 1.0))[..., :height, :width]

    def forward(self, blurry: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """The prior in [0, 1] of a blurry batch of any size (``self.prior`` says which)."""
        if self.prior == "official":
            return self.official_prior(blurry, steps)
        return self.generate(blurry, steps).clamp(0.0, 1.0)


class PriorFusedNet(RestorationNetwork):
    """A restoration network fed with the image and its diffusion prior, computed on the fly by a
    frozen :class:`LatentPriorModel` (the "online" mode, for datasets too small to precompute).

    ``forward(x)`` runs ``net(concat(x, prior(x)))``: with a 3-channel blurry image the network
    reads 6 channels, with dual-pixel views (6) it reads 9.
    """

    def __init__(self, prior: LatentPriorModel, net: nn.Module):
        super().__init__()
        self.prior = prior.requires_grad_(False)
        self.net = net
        self.input_channels = net.input_channels - IMAGE_CHANNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            prior = self.prior(x)
        return self.net(torch.cat([x, prior], dim=1))
