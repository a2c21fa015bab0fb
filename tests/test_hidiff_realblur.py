"""HI-Diff RealBlur stage two (official LDM path): parity with fixtures/official_parity/hidiff_realblur."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deblur_diffusion.checkpoints import load_weights, official_state_dict
from deblur_diffusion.cli import config_dir
from deblur_diffusion.models import LatentEncoder
from deblur_diffusion.stages import HIDiffStageTwo
from deblur_diffusion.weights import load_network

TOLERANCE = 1e-5


class RecordingDenoiser(torch.nn.Module):
    """Passes through and keeps each call's (z_t, step, output)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, z_t, condition, step):
        out = self.inner(z_t, condition, step)
        self.calls.append((z_t, step, out))
        return out


def preset_net_config(experiment, kwargs):
    """The network config of a RealBlur stage-two preset (schedule, prediction, noising, activations
    as the preset sets them), with the fixture's tiny sizes."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "model.stage1_ckpt=null", "paths.root_dir=.", "paths.output_dir=."])
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    net["transformer"].update(kwargs["net_g"])
    net["condition_encoder"].update(kwargs["net_le_dm"])
    net["denoiser"].update(kwargs["net_d"])
    net["diffusion"]["timesteps"] = kwargs["diffusion_schedule"]["timesteps"]
    return net


@pytest.fixture(params=["hidiff_realblur_j_s2", "hidiff_realblur_r_s2"])
def realblur(parity_dir, request):
    folder = parity_dir / "hidiff_realblur"
    kwargs = json.loads((folder / "config.json").read_text())["kwargs"]
    files = {
        "transformer": str(folder / "net_g.pth"),
        "condition_encoder": str(folder / "net_le_dm.pth"),
        "denoiser": str(folder / "net_d.pth"),
    }
    net = load_network(files, preset_net_config(request.param, kwargs)).net.eval()
    inputs, outputs = (torch.load(folder / f"{name}.pt", weights_only=True) for name in ("inputs", "outputs"))
    return folder, kwargs, net, inputs, outputs


def max_error(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_realblur_schedule_matches_the_official_buffers(realblur):
    _, _kwargs, net, _, outputs = realblur
    names = (
        "betas",
        "alphas_cumprod",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    )
    for name in names:
        assert max_error(getattr(net.diffusion, name), outputs[name]) < TOLERANCE, name
    assert net.diffusion.betas.dtype == torch.float32
    assert net.denoiser.max_period == 50  # timesteps left at 5, not the diffusion's T


@torch.no_grad()
def test_realblur_inference_matches_the_official_code(realblur):
    _, _, net, inputs, outputs = realblur
    lq = inputs["lq"]
    assert max_error(net.condition_encoder(lq), outputs["condition"]) < TOLERANCE
    net.denoiser = RecordingDenoiser(net.denoiser)
    prior = net.sample_prior(lq, noise=inputs["noise_test"])
    assert max_error(prior, outputs["prior_stage2"]) < TOLERANCE
    z_t, steps, predictions = zip(*net.denoiser.calls, strict=False)
    assert torch.equal(torch.stack(steps)[..., None].expand_as(outputs["denoiser_t_test"]), outputs["denoiser_t_test"])
    assert max_error(torch.stack(z_t), outputs["denoiser_x_test"]) < TOLERANCE
    assert max_error(torch.stack(predictions), outputs["denoiser_out_test"]) < TOLERANCE
    assert max_error(net(lq, prior), outputs["out_stage2"]) < TOLERANCE


@torch.no_grad()
def test_realblur_training_chain_matches_the_official_code(realblur):
    folder, kwargs, net, inputs, outputs = realblur
    latent_encoder = LatentEncoder(**kwargs["net_le"], activation="lrelu").eval()
    load_weights(latent_encoder, official_state_dict(folder / "net_le.pth"), "net_le.pth")
    target = latent_encoder(inputs["lq"], inputs["gt"])
    assert max_error(target, outputs["prior_stage1"]) < TOLERANCE
    z_T = net.diffusion.noisy_start(target, inputs["noise_train"])
    assert max_error(z_T, outputs["x_noisy_train"]) < TOLERANCE
    trajectory = []
    prior = net.diffusion.reverse(net.denoiser, net.condition_encoder(inputs["lq"]), z_T, trajectory)
    assert max_error(torch.stack(trajectory[1:]), outputs["prior_train_steps"]) < TOLERANCE
    assert max_error(prior, outputs["prior_train"]) < TOLERANCE
    assert max_error(net.transformer(inputs["lq"], prior), outputs["out_train"]) < TOLERANCE


def test_realblur_stage_two_losses_match_the_official_ones(realblur, monkeypatch):
    folder, kwargs, net, inputs, outputs = realblur
    stage = HIDiffStageTwo(
        net,
        LatentEncoder(**kwargs["net_le"], activation="lrelu"),
        torch.nn.L1Loss(),
        torch.optim.AdamW,
        stage1_ckpt={"transformer": str(folder / "net_g.pth"), "latent_encoder": str(folder / "net_le.pth")},
    )
    stage.warm_start()
    # The stage draws eps with torch.randn_like; feed it the recorded draw.
    monkeypatch.setattr(torch, "randn_like", lambda like, **_: inputs["noise_train"].clone())
    losses = stage.training_losses({"lq": inputs["lq"], "gt": inputs["gt"]})
    assert max_error(losses["image"].detach(), outputs["l_pix_train"]) < TOLERANCE
    assert max_error(losses["prior"].detach(), outputs["l_pix_diff_train"]) < TOLERANCE


def test_an_unknown_beta_schedule_is_refused():
    from deblur_diffusion.models import PriorDiffusion

    with pytest.raises(ValueError, match="schedule must be one of"):
        PriorDiffusion(schedule="cosine")
