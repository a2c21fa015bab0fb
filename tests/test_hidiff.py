"""HI-Diff: parity with the official code, the paper's sizes, the diffusion, and both stages."""

import json

import numpy as np
import pytest
import torch
from conftest import FAST_TRAINER, TINY_SYNTHETIC, run_cli

from deblur_diffusion.checkpoints import CheckpointError, load_weights, official_state_dict
from deblur_diffusion.inference import Inference
from deblur_diffusion.models import (
    HIDiff,
    HIDiffStageOneNet,
    LatentEncoder,
    MixerDenoiser,
    MLPDenoiser,
    PriorDiffusion,
    PriorGuidedRestormer,
)
from deblur_diffusion.models.hidiff import LEVEL_NAMES
from deblur_diffusion.stages import HIDiffStageTwo
from deblur_diffusion.summary import count_parameters, measure

TINY_TRANSFORMER = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1], embed_dim=8, group=4)


def official_parts(parity_dir):
    """The fixture's four networks, loaded through the package's official-file loader."""
    folder = parity_dir / "hidiff"
    kwargs = json.loads((folder / "config.json").read_text())["kwargs"]
    schedule = kwargs["diffusion_schedule"]
    parts = {
        "net_g": PriorGuidedRestormer(**kwargs["net_g"]),
        "net_le": LatentEncoder(**kwargs["net_le"]),
        "net_le_dm": LatentEncoder(**kwargs["net_le_dm"]),
        "net_d": MixerDenoiser(**kwargs["net_d"]),
    }
    for name, module in parts.items():
        load_weights(module, official_state_dict(folder / f"{name}.pth"), name)
        module.eval()
    diffusion = PriorDiffusion(schedule["timesteps"], schedule["linear_start"], schedule["linear_end"])
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    outputs = torch.load(folder / "outputs.pt", weights_only=True)
    return parts, diffusion, inputs, outputs


def max_error(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def test_stage_one_matches_the_official_code(parity_dir):
    parts, _, inputs, outputs = official_parts(parity_dir)
    prior = parts["net_le"](inputs["lq"], inputs["gt"])
    assert max_error(prior, outputs["prior_stage1"]) < 1e-5
    assert max_error(parts["net_g"](inputs["lq"], prior), outputs["out_stage1"]) < 1e-5
    stage_one = HIDiffStageOneNet(parts["net_g"], parts["net_le"])
    assert max_error(stage_one(torch.cat([inputs["lq"], inputs["gt"]], dim=1)), outputs["out_stage1"]) < 1e-5


@torch.no_grad()
def test_stage_two_and_the_sampler_match_the_official_code(parity_dir):
    parts, diffusion, inputs, outputs = official_parts(parity_dir)
    net = HIDiff(parts["net_g"], parts["net_le_dm"], parts["net_d"], diffusion)
    assert max_error(net.condition_encoder(inputs["lq"]), outputs["condition"]) < 1e-5
    prior = net.sample_prior(inputs["lq"], noise=inputs["noise"])
    assert max_error(prior, outputs["prior_stage2"]) < 1e-5
    assert max_error(net(inputs["lq"], prior), outputs["out_stage2"]) < 1e-5


def test_official_stage_one_files_initialise_stage_two(parity_dir):
    parts, diffusion, _, _ = official_parts(parity_dir)
    kwargs = json.loads((parity_dir / "hidiff" / "config.json").read_text())["kwargs"]
    net = HIDiff(PriorGuidedRestormer(**kwargs["net_g"]), LatentEncoder(**kwargs["net_le_dm"]), MixerDenoiser(**kwargs["net_d"]), diffusion)
    stage = HIDiffStageTwo(
        net,
        LatentEncoder(**kwargs["net_le"]),
        torch.nn.L1Loss(),
        torch.optim.AdamW,
        stage1_ckpt={"transformer": str(parity_dir / "hidiff" / "net_g.pth"), "latent_encoder": str(parity_dir / "hidiff" / "net_le.pth")},
    )
    stage.warm_start()
    for name, value in parts["net_g"].state_dict().items():
        assert torch.equal(stage.net.transformer.state_dict()[name], value)
    for name, value in parts["net_le"].state_dict().items():
        assert torch.equal(stage.latent_encoder.state_dict()[name], value)


def test_wrong_architecture_names_the_keys(parity_dir):
    other = PriorGuidedRestormer(**{**TINY_TRANSFORMER, "num_blocks": [1, 1, 2, 2]})
    with pytest.raises(CheckpointError, match=r"net_g\.pth does not fit PriorGuidedRestormer: .*encoder_level3\.blocks\.1"):
        load_weights(other, official_state_dict(parity_dir / "hidiff" / "net_g.pth"), str(parity_dir / "hidiff" / "net_g.pth"))
    with pytest.raises(CheckpointError, match="not found: .*missing.pth"):
        official_state_dict(parity_dir / "missing.pth")


def gopro_parts():
    return (
        PriorGuidedRestormer(),
        LatentEncoder(in_chans=6, stage=1),
        LatentEncoder(in_chans=3, stage=2),
        MixerDenoiser(),
    )


def test_gopro_configuration_has_the_paper_sizes():
    transformer, le, le_dm, denoiser = gopro_parts()
    counts = [count_parameters(m) for m in (transformer, le, le_dm, denoiser)]
    assert counts == [25_298_923, 585_688, 558_040, 2_629_937]
    net = HIDiff(transformer, le_dm, denoiser, PriorDiffusion(timesteps=8))
    assert count_parameters(net) == 28_486_900
    flops_by_path, total = measure(net, torch.zeros(1, 3, 256, 256))
    assert total / 2e9 == pytest.approx(142.62, rel=5e-3)
    assert flops_by_path["transformer"] / 2e9 == pytest.approx(140.21, rel=5e-3)
    assert flops_by_path["condition_encoder"] / 2e9 == pytest.approx(2.077, rel=5e-3)
    assert flops_by_path["denoiser"] / 2e9 / 8 == pytest.approx(0.0422, rel=5e-3)


def test_single_guide_replaces_the_latent_modulation_by_a_him():
    multi = PriorGuidedRestormer()
    single = PriorGuidedRestormer(multi_scale_prior=False)
    assert not hasattr(single, "down_1") and hasattr(single.latent, "him")
    # Paper Table 1: Single-Guide has 2.01 M parameters fewer than HI-Diff.
    assert (count_parameters(multi) - count_parameters(single)) / 1e6 == pytest.approx(2.01, abs=0.005)
    image, prior = torch.rand(1, 3, 16, 16), torch.randn(1, 16, 256)
    with torch.no_grad():
        assert single(image, prior).shape == (1, 3, 16, 16)


def test_him_shapes_at_every_level():
    net = PriorGuidedRestormer(**{**TINY_TRANSFORMER, "dim": 8, "heads": [1, 2, 2, 4]}).eval()
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = (tuple(args[0].shape), tuple(args[1].shape), tuple(output.shape))

        return hook

    for name in LEVEL_NAMES:
        level = getattr(net, name)
        target = level.him if hasattr(level, "him") else level
        target.register_forward_hook(record(name))
    with torch.no_grad():
        net(torch.rand(2, 3, 40, 24), torch.randn(2, 16, 32))
    z1, z2, z3 = (2, 16, 32), (2, 4, 32), (2, 32)
    expected = {
        "encoder_level1": ((2, 8, 40, 24), z1),
        "encoder_level2": ((2, 16, 20, 12), z2),
        "encoder_level3": ((2, 32, 10, 6), z2),
        "latent": ((2, 64, 5, 3), z3),
        "decoder_level3": ((2, 32, 10, 6), z2),
        "decoder_level2": ((2, 16, 20, 12), z2),
        "decoder_level1": ((2, 16, 40, 24), z1),
        "refinement": ((2, 16, 40, 24), z1),
    }
    for name, (features, prior) in expected.items():
        assert seen[name] == (features, prior, features), name


def test_bad_inputs_are_rejected_with_the_expected_shape():
    net = PriorGuidedRestormer(**TINY_TRANSFORMER)
    with pytest.raises(ValueError, match=r"prior of shape \(1, 16, 32\)"):
        net(torch.rand(1, 3, 16, 16), torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="in_chans=6"):
        LatentEncoder(in_chans=3, stage=1)
    with pytest.raises(ValueError, match="blurry and sharp"):
        LatentEncoder(in_chans=6, stage=1)(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("timesteps", [1, 2, 4, 8, 16, 32])
def test_betas_are_reinterpolated_over_the_same_range(timesteps):
    diffusion = PriorDiffusion(timesteps=timesteps)
    reference = [0.1 + (0.99 - 0.1) * i / (timesteps - 1) for i in range(timesteps)] if timesteps > 1 else [0.1]
    np.testing.assert_allclose(diffusion.betas.numpy(), reference, rtol=1e-6)
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), np.cumprod(1 - np.array(reference)), rtol=1e-5)


class CountingDenoiser(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.steps = []

    def forward(self, z_t, condition, step):
        self.steps.append(step.tolist())
        return self.inner(z_t, condition, step)


@pytest.mark.parametrize("timesteps", [1, 4, 8])
def test_the_reverse_chain_calls_the_denoiser_once_per_step_from_t_down(timesteps):
    denoiser = CountingDenoiser(MixerDenoiser(32, 32, 16, block_num=3))
    trajectory = []
    with torch.no_grad():
        PriorDiffusion(timesteps=timesteps).reverse(denoiser, torch.randn(2, 16, 32), torch.randn(2, 16, 32), trajectory)
    assert denoiser.steps == [[step, step] for step in reversed(range(timesteps))]
    assert len(trajectory) == timesteps + 1


def test_one_step_of_the_chain_is_the_posterior_mean_of_the_clamped_estimate():
    diffusion = PriorDiffusion(timesteps=4)
    z_t, eps = torch.randn(1, 16, 8) * 3, torch.randn(1, 16, 8)
    betas = np.linspace(0.1, 0.99, 4)
    abar = np.cumprod(1 - betas)
    t = 3
    x0 = np.clip(np.sqrt(1 / abar[t]) * z_t.numpy() - np.sqrt(1 / abar[t] - 1) * eps.numpy(), -1, 1)
    mean = betas[t] * np.sqrt(abar[t - 1]) / (1 - abar[t]) * x0 + (1 - abar[t - 1]) * np.sqrt(1 - betas[t]) / (1 - abar[t]) * z_t.numpy()
    step = diffusion.posterior_mean_coef1[t] * diffusion.predict_x0(z_t, eps, t) + diffusion.posterior_mean_coef2[t] * z_t
    np.testing.assert_allclose(step.numpy(), mean, rtol=1e-5, atol=1e-6)


def tiny_hidiff(noise_seed=0, **diffusion):
    return HIDiff(
        PriorGuidedRestormer(**TINY_TRANSFORMER),
        LatentEncoder(in_chans=3, embed_dim=8, block_num=1, stage=2),
        MixerDenoiser(32, 32, 16, block_num=3),
        PriorDiffusion(**diffusion),
        noise_seed=noise_seed,
    )


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    torch.manual_seed(0)
    net = tiny_hidiff().eval()
    images = torch.rand(3, 3, 24, 24)
    with torch.no_grad():
        together = net(images)
        alone = net(images[1:2])
        again = net(images)
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-6)
    assert torch.equal(together, again)
    net.noise_seed = None
    with torch.no_grad():
        assert not torch.equal(net(images), net(images))


def test_mlp_denoiser_with_x0_prediction_samples_without_clamping():
    net = HIDiff(
        PriorGuidedRestormer(**TINY_TRANSFORMER),
        LatentEncoder(in_chans=3, embed_dim=8, block_num=1, stage=2, activation="lrelu"),
        MLPDenoiser(n_feats=8, n_denoise_res=2),
        PriorDiffusion(timesteps=16, prediction="x0", clip_x0=False),
    )
    with torch.no_grad():
        net.denoiser.resmlp[-1].resmlp[0].bias.fill_(5.0)
        prior = net.sample_prior(torch.rand(1, 3, 16, 16))
    assert prior.shape == (1, 16, 32) and prior.max() > 1.0


def tiny_stage_two(**kwargs):
    torch.manual_seed(0)
    return HIDiffStageTwo(
        tiny_hidiff(),
        LatentEncoder(in_chans=6, embed_dim=8, block_num=1, stage=1),
        torch.nn.L1Loss(),
        lambda params: torch.optim.AdamW(params, lr=1e-2),
        **kwargs,
    )


def train_steps(stage, steps=3):
    optimizer = stage.configure_optimizers()
    batch = {"lq": torch.rand(2, 3, 16, 16), "gt": torch.rand(2, 3, 16, 16), "name": ["a", "b"]}
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(stage.training_losses(batch).values())
        loss.backward()
        optimizer.step()
    return optimizer


def snapshot(module):
    return {name: value.clone() for name, value in module.state_dict().items()}


def test_stage_two_freezes_le_while_the_rest_learns():
    stage = tiny_stage_two()
    before = {
        name: snapshot(getattr(stage, name) if name == "latent_encoder" else getattr(stage.net, name))
        for name in ("latent_encoder", "transformer", "condition_encoder", "denoiser")
    }
    optimizer = train_steps(stage)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(p.grad is None and id(p) not in optimised for p in stage.latent_encoder.parameters())
    for name, values in before.items():
        module = stage.latent_encoder if name == "latent_encoder" else getattr(stage.net, name)
        changed = any(not torch.equal(values[key], value) for key, value in module.state_dict().items())
        assert changed == (name != "latent_encoder"), name


def test_the_chain_gradient_reaches_the_denoiser_through_every_step():
    stage = tiny_stage_two()
    losses = stage.training_losses({"lq": torch.rand(2, 3, 16, 16), "gt": torch.rand(2, 3, 16, 16), "name": ["a", "b"]})
    assert set(losses) == {"image", "prior"}
    losses["image"].backward()
    assert stage.net.denoiser.time_mlp.grad.abs() > 0
    assert all(p.grad.abs().sum() > 0 for p in stage.net.condition_encoder.parameters())


def test_split_training_trains_only_the_diffusion_on_noise_prediction():
    stage = tiny_stage_two(joint_training=False)
    transformer = snapshot(stage.net.transformer)
    denoiser = snapshot(stage.net.denoiser)
    batch = {"lq": torch.rand(2, 3, 16, 16), "gt": torch.rand(2, 3, 16, 16), "name": ["a", "b"]}
    assert set(stage.training_losses(batch)) == {"diffusion"}
    train_steps(stage)
    assert all(torch.equal(transformer[k], v) for k, v in stage.net.transformer.state_dict().items())
    assert any(not torch.equal(denoiser[k], v) for k, v in stage.net.denoiser.state_dict().items())


def test_tiled_inference_samples_the_prior_per_tile_or_per_image():
    tiles = Inference(mode="tiles", tile_size=16, stride=12, tile_batch_size=2)
    image = torch.rand(1, 3, 28, 28)
    for scope, expected_sizes in (("tile", [(16, 16)] * 2), ("image", [(32, 32)])):
        stage = tiny_stage_two(prior_scope=scope, inference=tiles).eval()
        sizes = []
        stage.net.condition_encoder.register_forward_hook(lambda m, args, out, sizes=sizes: sizes.append(tuple(args[0].shape[-2:])))
        with torch.no_grad():
            restored = stage(image)
        assert restored.shape == image.shape
        assert sizes == expected_sizes, scope


def test_stage_two_rejects_a_stage_one_checkpoint_of_another_size(tmp_path):
    other = HIDiffStageOneNet(PriorGuidedRestormer(**{**TINY_TRANSFORMER, "dim": 16}), LatentEncoder(embed_dim=8, block_num=1))
    torch.save({"state_dict": {f"net.{k}": v for k, v in other.state_dict().items()}}, tmp_path / "s1.ckpt")
    with pytest.raises(CheckpointError, match=r"s1\.ckpt \(net\.transformer\) does not fit .*wrong shape"):
        tiny_stage_two(stage1_ckpt=str(tmp_path / "s1.ckpt")).warm_start()


TINY_HIDIFF = [
    "model.net.transformer.dim=8",
    "model.net.transformer.num_blocks=[1,1,1,1]",
    "model.net.transformer.num_refinement_blocks=1",
    "model.net.transformer.heads=[1,1,1,1]",
    "model.net.transformer.embed_dim=8",
]


@pytest.mark.slow
def test_both_stages_train_through_the_cli_stage_two_from_stage_one(tmp_path):
    common = [*TINY_HIDIFF, *TINY_SYNTHETIC, *FAST_TRAINER, "test=false"]
    first = run_cli(
        "train", "model=hidiff_s1", "model.net.latent_encoder.block_num=1", *common, f"hydra.run.dir={tmp_path}/s1", cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-3000:]
    stage_one = next((tmp_path / "s1" / "checkpoints").glob("step*.ckpt"))

    second = run_cli(
        "train",
        "model=hidiff_s2",
        f"model.stage1_ckpt={stage_one}",
        "model.net.condition_encoder.block_num=1",
        "model.latent_encoder.block_num=1",
        "model.net.denoiser.in_channel=32",
        "model.net.denoiser.out_channel=32",
        "model.net.denoiser.inner_channel=16",
        "inference=tiles",
        "inference.tile_size=24",
        "inference.stride=16",
        *common,
        f"hydra.run.dir={tmp_path}/s2",
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "restored" in second.stdout and (tmp_path / "s2" / "samples" / "latest.png").is_file()
    stage_two = torch.load(next((tmp_path / "s2" / "checkpoints").glob("step*.ckpt")), weights_only=True)["state_dict"]
    stage_one_weights = torch.load(stage_one, weights_only=True)["state_dict"]
    le_keys = [k for k in stage_one_weights if k.startswith("net.latent_encoder.")]
    assert le_keys and all(torch.equal(stage_two[k.replace("net.", "", 1)], stage_one_weights[k]) for k in le_keys)

    # Resuming reads every weight from the run's own checkpoint, not from stage one's (gone here).
    stage_one.rename(tmp_path / "moved.ckpt")
    resumed = run_cli("train", *second.args[3:], f"ckpt_path={tmp_path}/s2/checkpoints/last.ckpt", "trainer.max_steps=6", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.slow
def test_stage_two_without_stage_one_names_the_missing_key(tmp_path):
    result = run_cli("train", "model=hidiff_s2", *TINY_SYNTHETIC, *FAST_TRAINER, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 1 and "model.stage1_ckpt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_summary_shows_the_inference_split(tmp_path):
    result = run_cli("summary", "model=hidiff_s2", "model.stage1_ckpt=null", "height=32", "width=32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for count in ("25,298,923", "558,040", "2,629,937", "28,486,900"):
        assert count in result.stdout


def test_the_reverse_chain_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    net = tiny_hidiff(clip_x0=False).eval()  # unclipped, the x0 amplification of rounding shows
    condition = net.condition_encoder(torch.rand(2, 3, 24, 24))
    z_T = torch.randn_like(condition)
    with torch.no_grad():
        reference = net.diffusion.reverse(net.denoiser, condition, z_T)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net.diffusion.reverse(net.denoiser, condition, z_T)
    assert mixed.dtype == torch.float32
    assert (mixed - reference).abs().max().item() < 1e-6 * reference.abs().max().item()
