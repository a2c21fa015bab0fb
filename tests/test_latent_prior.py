"""Swintormer's diffusion prior: the model, its three stages, generate_prior and the fused Swintormer."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import FAST_TRAINER, TINY_SYNTHETIC, run_cli
from diffusers import UNet2DModel, VQModel
from einops import rearrange
from lightning import Trainer
from networks import prior_fused_swintormer_overrides, tiny_overrides
from torch.utils.data import DataLoader

from deblur_diffusion.checkpoints import CheckpointError, stage_weights
from deblur_diffusion.data.io import read_image_raw
from deblur_diffusion.models import LatentPriorModel, PriorFusedNet, Swintormer
from deblur_diffusion.stages import AutoencoderStage, DecoderFinetuneStage, LatentDiffusionStage, PriorFusedStage

TINY_LDM = ["model/ldm_net@model.net=tiny"]


def tiny_parts():
    autoencoder = VQModel(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=3,
        num_vq_embeddings=64,
        vq_embed_dim=3,
        norm_num_groups=8,
    )
    unet = UNet2DModel(
        sample_size=16,
        in_channels=6,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return autoencoder, unet


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return LatentPriorModel(*tiny_parts(), sampling_steps=5, **kwargs)


def test_the_prior_has_the_input_size_and_is_reproducible_with_a_seed():
    model = tiny_model().eval()
    blurry = torch.rand(2, 3, 40, 52)
    prior = model(blurry)
    assert prior.shape == blurry.shape and prior.min() >= 0 and prior.max() <= 1
    assert torch.equal(prior, model(blurry))
    model.noise_seed = 1
    assert not torch.equal(prior, model(blurry))


@pytest.mark.parametrize("prior", ["official", "paper_decoder"])
def test_an_image_gets_the_prior_it_gets_alone_in_any_batch(prior):
    # generate_prior batches images: a prior must not depend on its batch or its place in it.
    model = tiny_model(prior=prior, eta=1.0, condition_multiple=8).eval()
    blurry = torch.rand(3, 3, 32, 40)
    batched = model(blurry)
    for index in range(3):
        # 1e-4: the first DDIM steps amplify float32 reordering noise, as in test_compvis_ldm.
        assert (model(blurry[index : index + 1]) - batched[index : index + 1]).abs().max() < 1e-4


@pytest.mark.parametrize("steps", [5, 10, 20, 50])
def test_ddim_with_t_steps_calls_the_unet_t_times(steps):
    model = tiny_model().eval()
    timesteps = []
    model.unet.register_forward_hook(lambda module, args, output: timesteps.append(int(args[1][0])))
    trajectory = []
    model.sample_latents(torch.rand(1, 3, 32, 32), steps=steps, trajectory=trajectory)
    assert len(timesteps) == steps == len(trajectory)
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == steps and max(timesteps) < 1000


@pytest.mark.parametrize("steps", [30, 7])
def test_ddim_with_t_not_dividing_1000_runs_ldm_s_uniform_timesteps(steps):
    # LDM's make_ddim_timesteps('uniform'): range(0, 1000, 1000 // T) + 1, so T = 30 runs 31 steps.
    model = tiny_model().eval()
    timesteps = []
    model.unet.register_forward_hook(lambda module, args, output: timesteps.append(int(args[1][0])))
    model.sample_latents(torch.rand(1, 3, 32, 32), steps=steps)
    assert timesteps == [t + 1 for t in reversed(range(0, 1000, 1000 // steps))]


def test_a_unet_that_does_not_read_the_condition_is_rejected():
    autoencoder, _ = tiny_parts()
    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(ValueError, match="must read 6 channels"):
        LatentPriorModel(autoencoder, unet)


def snapshot(module):
    return {name: value.clone() for name, value in module.state_dict().items()}


def test_decoder_finetuning_leaves_encoder_codebook_and_unet_untouched():
    stage = DecoderFinetuneStage(tiny_model(), torch.nn.L1Loss(), lambda params: torch.optim.AdamW(params, lr=1e-2))
    frozen = {
        name: snapshot(stage.net.get_submodule(name))
        for name in ("autoencoder.encoder", "autoencoder.quant_conv", "autoencoder.quantize", "unet")
    }
    decoder = snapshot(stage.net.autoencoder.decoder)
    optimizer = stage.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    batch = {"lq": torch.rand(2, 3, 32, 32), "gt": torch.rand(2, 3, 32, 32)}
    for _ in range(2):
        optimizer.zero_grad()
        sum(stage.training_losses(batch).values()).backward()
        optimizer.step()
    for name, values in frozen.items():
        module = stage.net.get_submodule(name)
        assert all(p.grad is None and id(p) not in optimised for p in module.parameters()), name
        assert all(torch.equal(values[key], value) for key, value in module.state_dict().items()), name
    assert any(not torch.equal(decoder[key], value) for key, value in stage.net.autoencoder.decoder.state_dict().items())


@pytest.mark.parametrize("stage_class, trained", [(AutoencoderStage, "autoencoder"), (LatentDiffusionStage, "unet")])
def test_each_stage_trains_only_its_part(stage_class, trained):
    stage = stage_class(tiny_model(), torch.nn.L1Loss(), torch.optim.AdamW)
    batch = {"lq": torch.rand(2, 3, 32, 32), "gt": torch.rand(2, 3, 32, 32)}
    sum(stage.training_losses(batch).values()).backward()
    for part in ("autoencoder", "unet"):
        grads = [p.grad for p in stage.net.get_submodule(part).parameters()]
        if part == trained:
            assert any(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads)


def test_the_autoencoder_codebook_starts_from_encoder_outputs():
    stage = AutoencoderStage(tiny_model(), torch.nn.L1Loss(), lambda params: torch.optim.SGD(params, lr=0.0))
    images = torch.rand(4, 3, 32, 32)
    loader = DataLoader([{"lq": image, "gt": image, "name": str(i)} for i, image in enumerate(images)], batch_size=4)
    latents = rearrange(stage.net.encode(images * 2 - 1).detach(), "b c h w -> (b h w) c")

    def distance_to_nearest_latent():
        return (
            torch.cdist(stage.net.autoencoder.quantize.embedding.weight.detach(), latents, compute_mode="donot_use_mm_for_euclid_dist")
            .min(dim=1)
            .values
        )

    assert distance_to_nearest_latent().max() > 0.01
    Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    ).fit(stage, loader)
    assert distance_to_nearest_latent().max() < 1e-5


def test_a_diffusers_folder_initialises_the_model(tmp_path):
    source = tiny_model()
    source.autoencoder.save_pretrained(tmp_path / "ldm" / "vqvae")
    source.unet.save_pretrained(tmp_path / "ldm" / "unet")
    torch.manual_seed(1)
    stage = LatentDiffusionStage(
        LatentPriorModel(*tiny_parts()), torch.nn.L1Loss(), torch.optim.AdamW, pretrained_dir=str(tmp_path / "ldm")
    )
    stage.warm_start()
    for part in ("autoencoder", "unet"):
        expected = source.get_submodule(part).state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in stage.net.get_submodule(part).state_dict().items())
    with pytest.raises(CheckpointError, match=r"no diffusers-format LDM weights in .*missing: expected .*vqvae"):
        LatentDiffusionStage(tiny_model(), torch.nn.L1Loss(), torch.optim.AdamW, pretrained_dir=str(tmp_path / "missing")).warm_start()


def test_online_prior_is_frozen_and_feeds_six_channels():
    net = PriorFusedNet(
        tiny_model(), Swintormer(inp_channels=6, dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1], window_size=4)
    )
    stage = PriorFusedStage(net, torch.nn.L1Loss(), torch.optim.AdamW)
    params = {id(p) for group in stage.configure_optimizers().param_groups for p in group["params"]}
    assert not any(id(p) in params for p in net.prior.parameters())
    assert all(id(p) in params for p in net.net.parameters())
    assert net.input_channels == 3 and net(torch.rand(1, 3, 24, 24)).shape == (1, 3, 24, 24)


def test_the_online_prior_stays_out_of_the_ema_and_loads_back_with_it():
    net = PriorFusedNet(
        tiny_model(), Swintormer(inp_channels=6, dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1], window_size=4)
    )
    stage = PriorFusedStage(net, torch.nn.L1Loss(), torch.optim.AdamW, ema_decay=0.9)
    with torch.no_grad():
        for parameter in stage.ema.parameters():
            parameter.add_(0.01)  # the EMA now differs from the raw weights everywhere
    state = stage.state_dict()
    assert not any(key.startswith("ema.module.prior.") for key in state)
    assert sum(p.numel() for p in stage.ema.parameters()) == sum(p.numel() for p in net.net.parameters())
    checkpoint = {"state_dict": state}
    stage.on_save_checkpoint(checkpoint)
    weights, used_ema = stage_weights(checkpoint, "net", ema=True, source="test")
    assert used_ema and set(weights) == set(net.state_dict())
    assert torch.equal(weights["net.skip_conv.weight"], stage.ema.module.skip_conv.weight)
    assert torch.equal(weights["prior.unet.conv_in.weight"], net.prior.unet.conv_in.weight)
    image = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(stage(image), stage.ema.module(torch.cat([image, net.prior(image)], dim=1)), rtol=0, atol=0)


def ckpt_of(folder):
    return next((folder / "checkpoints").glob("step*.ckpt"))


@pytest.mark.slow
def test_the_chain_trains_through_the_cli_and_feeds_swintormer(tmp_path):
    common = [*TINY_LDM, *TINY_SYNTHETIC, *FAST_TRAINER, "test=false"]
    first = run_cli("train", "model=ldm_autoencoder", *common, f"hydra.run.dir={tmp_path}/ae", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(
        "train", "model=ldm_prior", f"model.init_ckpt={ckpt_of(tmp_path / 'ae')}", *common, f"hydra.run.dir={tmp_path}/prior", cwd=tmp_path
    )
    assert second.returncode == 0, second.stderr[-3000:]
    third = run_cli(
        "train",
        "model=ldm_decoder_finetune",
        f"model.init_ckpt={ckpt_of(tmp_path / 'prior')}",
        *common,
        f"hydra.run.dir={tmp_path}/decoder",
        cwd=tmp_path,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    ae = torch.load(ckpt_of(tmp_path / "ae"), weights_only=True)["state_dict"]
    final = torch.load(ckpt_of(tmp_path / "decoder"), weights_only=True)["state_dict"]
    encoder_keys = [k for k in ae if k.startswith("net.autoencoder.encoder.")]
    assert encoder_keys and all(torch.equal(ae[k], final[k]) for k in encoder_keys)

    assert (
        run_cli("data.synthesize", f"out={tmp_path}/GoPro", "train_pairs=4", "test_pairs=2", "image_size=40", cwd=tmp_path).returncode == 0
    )
    # No prior= given: a decoder fine-tuning checkpoint records the decoded prior it was made for.
    for split, extra in (("train", "steps=2"), ("val", "steps=2"), ("test", "steps=2")):
        made = run_cli(
            "generate_prior",
            f"ckpt={ckpt_of(tmp_path / 'decoder')}",
            "data=gopro",
            f"paths.data_dir={tmp_path}",
            f"split={split}",
            f"out={tmp_path}/priors",
            extra,
            cwd=tmp_path,
        )
        assert made.returncode == 0, made.stderr[-3000:]
    priors = sorted((tmp_path / "priors" / "train").glob("*.png"))
    assert len(priors) == 4 and read_image_raw(priors[0]).shape == (40, 40, 3) and read_image_raw(priors[0]).dtype == np.uint16
    manifest = json.loads((tmp_path / "priors" / "train" / "manifest.json").read_text())
    assert manifest["steps"] == 2 and len(manifest["priors"]) == 4 and manifest["prior"] == "paper_decoder"
    again = run_cli(
        "generate_prior",
        f"ckpt={ckpt_of(tmp_path / 'decoder')}",
        "prior=paper_decoder",
        "data=gopro",
        f"paths.data_dir={tmp_path}",
        f"out={tmp_path}/priors",
        "steps=2",
        cwd=tmp_path,
    )
    assert "0 priors written, 4 already there" in again.stdout

    fused = run_cli(
        "train",
        *prior_fused_swintormer_overrides(tmp_path, tmp_path / "priors"),
        *FAST_TRAINER,
        "inference=tiles",
        "inference.tile_size=32",
        "inference.stride=16",
        f"hydra.run.dir={tmp_path}/fused",
        cwd=tmp_path,
    )
    assert fused.returncode == 0, fused.stderr[-3000:]
    assert "Test" in fused.stdout and "restored" in fused.stdout
    weights = torch.load(ckpt_of(tmp_path / "fused"), weights_only=True)["state_dict"]
    assert weights["net.patch_embed.proj2.weight"].shape[1] == 6 * 4

    online = run_cli(
        "train",
        "model=swintormer_online_prior",
        f"model.prior_ckpt={ckpt_of(tmp_path / 'decoder')}",
        "model/ldm_net@model.net.prior=tiny",
        *tiny_overrides("swintormer", prefix="model.net.net"),
        *TINY_SYNTHETIC,
        *FAST_TRAINER,
        "test=false",
        f"hydra.run.dir={tmp_path}/online",
        cwd=tmp_path,
    )
    assert online.returncode == 0, online.stderr[-3000:]


@pytest.mark.slow
def test_missing_priors_are_named(tmp_path):
    assert (
        run_cli("data.synthesize", f"out={tmp_path}/GoPro", "train_pairs=2", "test_pairs=1", "image_size=32", cwd=tmp_path).returncode == 0
    )
    result = run_cli(
        "train",
        "model=swintormer",
        *tiny_overrides("swintormer"),
        "data=gopro",
        f"paths.data_dir={tmp_path}",
        f"data.prior_dir={tmp_path}/priors",
        "data.num_workers=0",
        "data.patch_schedule=[[0,32,2]]",
        *FAST_TRAINER,
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert re.search(r"priors/(train|val) does not exist; write it with python -m deblur_diffusion.generate_prior", result.stderr)


@pytest.mark.parametrize("size", [(40, 52), (100, 120), (128, 200)])
def test_the_official_prior_pads_its_condition_as_generate_feature_py(size, monkeypatch):
    # generate_feature.py's get_cond: the [0, 1] image padded at the bottom and right to a multiple
    # of 128 (check_image_size(c, 16): 16 * 8), by reflection, or with zeros when a side is too
    # short to reflect (its except branch), and only then mapped to [-1, 1].
    import torch.nn.functional as F

    model = tiny_model(prior="official").eval()
    blurry = torch.rand(1, 3, *size)
    height, width = size
    official_pad = (0, (128 - width % 128) % 128, 0, (128 - height % 128) % 128)
    try:
        padded = F.pad(blurry, official_pad, "reflect")
    except RuntimeError:
        padded = F.pad(blurry, official_pad, "constant")
    expected = 2.0 * padded - 1.0
    conditions = []

    def capture(condition, *args, **kwargs):
        conditions.append(condition)
        return torch.zeros(condition.shape[0], 3, *condition.shape[-2:])

    monkeypatch.setattr(model, "sample", capture)
    model(blurry)
    torch.testing.assert_close(conditions[0], expected, rtol=0, atol=1e-6)
