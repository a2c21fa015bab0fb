"""``train(cfg)`` in process, on configs composed from conf/ as the CLI does."""

import pytest
import torch
from conftest import FAST_TRAINER, TINY_RESTORMER, TINY_SYNTHETIC, compose_config, official_schedule

from deblur_diffusion.data.schedule import ProgressiveSchedule
from deblur_diffusion.losses import CharbonnierLoss
from deblur_diffusion.planning import training_plan
from deblur_diffusion.train import train


def compose_train(tmp_path, *overrides):
    return compose_config("train", tmp_path, *overrides, output_dir=tmp_path / "run")


def test_train_returns_the_monitored_metric_and_logs_to_tensorboard(tmp_path):
    cfg = compose_train(
        tmp_path,
        *TINY_RESTORMER,
        *TINY_SYNTHETIC,
        *FAST_TRAINER,
        "logger=[csv,tensorboard]",
        "model/loss=charbonnier",
        "model.ema_decay=0.9",
    )
    value = train(cfg)
    checkpoint = torch.load(next((tmp_path / "run" / "checkpoints").glob("step*.ckpt")), weights_only=True)
    best_score = checkpoint["callbacks"][next(k for k in checkpoint["callbacks"] if "ModelCheckpoint" in k)]["best_model_score"]
    assert value == pytest.approx(float(best_score), abs=1e-5)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()
    assert any(k.startswith("ema.module.") for k in checkpoint["state_dict"])


@pytest.mark.parametrize("experiment", ["quickstart", "restormer_gopro", "restormer_dpdd", "restormer_dpdd_dual"])
def test_restormer_presets_compose(tmp_path, experiment):
    cfg = compose_train(tmp_path, f"experiment={experiment}")
    assert cfg.model.net.inp_channels == (6 if experiment.endswith("dual") else 3)
    assert cfg.model.net.dual_pixel_task == experiment.endswith("dual")
    if experiment != "quickstart":
        # Restormer's option files: phases [92k, 64k, 48k, 36k, 36k, 24k], 8 GPUs x [8, 5, 4, 2, 1, 1] = global [64, 40, 32, 16, 8, 8].
        # Each phase carries the official per-GPU batch as its cap.
        schedule = official_schedule(
            [92000, 64000, 48000, 36000, 36000, 24000], [128, 160, 192, 256, 320, 384], [64, 40, 32, 16, 8, 8], [8, 5, 4, 2, 1, 1]
        )
        assert ProgressiveSchedule(cfg.data.patch_schedule).phases == schedule.phases
        assert schedule.per_device_batches(8, 1) == [8, 5, 4, 2, 1, 1]
        plan = training_plan(cfg)  # trainer=gpu: one device
        assert plan.accumulation == 8 and [phase.micro_batch for phase in plan.phases] == [8, 5, 4, 2, 1, 1]
        cfg.trainer.accumulate_grad_batches = plan.accumulation  # as train sets it
        assert cfg.trainer.max_steps == 300000 and cfg.trainer.val_check_interval == 4000 * 8


# Swintormer as its paper states it (Sec. 4), and as its released option file.
SWINTORMER_RECIPES = {
    "swintormer_dpdd": dict(batch=11, steps=300_000, periods=[300_000], eta_mins=[1e-6]),
    "swintormer_dpdd_release": dict(batch=9, steps=5_000_000, periods=[12_000, 840_000], eta_mins=[3e-4, 1e-5]),
}


@pytest.mark.parametrize("experiment", list(SWINTORMER_RECIPES))
def test_swintormer_presets_hold_their_sources_recipe(tmp_path, experiment):
    recipe = SWINTORMER_RECIPES[experiment]
    cfg = compose_train(tmp_path, f"experiment={experiment}")
    assert cfg.model.net.inp_channels == 6 and list(cfg.data.train.views) == ["r", "l"]
    assert cfg.model.optimizer.lr == 3e-4 and cfg.model.optimizer.weight_decay == 1e-4 and list(cfg.model.optimizer.betas) == [0.9, 0.99]
    assert cfg.model.ema_decay == 0.999 and cfg.model.grad_clip_norm == 0.01
    assert [list(p)[:3] for p in cfg.data.patch_schedule] == [[0, 256, recipe["batch"]]] and cfg.trainer.max_steps == recipe["steps"]
    assert list(cfg.model.scheduler.periods) == recipe["periods"] and list(cfg.model.scheduler.eta_mins) == recipe["eta_mins"]
    assert cfg.inference.mode == "tiles" and (cfg.inference.tile_size, cfg.inference.stride) == (256, 220)


def test_swintormer_single_image_preset_reads_the_combined_view(tmp_path):
    cfg = compose_train(tmp_path, "experiment=swintormer_dpdd_single")
    assert cfg.model.net.inp_channels == 3 and list(cfg.data.train.views) == ["c"]
    assert cfg.inference.mode == "tiles" and cfg.model.ema_decay == 0.999


@pytest.mark.parametrize("data", ["dpdd", "dpdd_dual"])
def test_swintormer_on_dpdd_composes_with_matching_channels(tmp_path, data):
    cfg = compose_train(tmp_path, "model=swintormer", f"data={data}")
    assert cfg.model.net.inp_channels == (6 if data == "dpdd_dual" else 3)


def test_charbonnier_values_and_gradients():
    target = torch.rand(2, 3, 4, 4)
    loss = CharbonnierLoss(eps=0.04)
    # Differences of 0.03 with eps 0.04: the 3-4-5 triangle, a loss of exactly 0.05.
    torch.testing.assert_close(loss(target + 0.03, target), torch.tensor(0.05))
    torch.testing.assert_close(loss(target, target), torch.tensor(0.04))
    # Smooth at zero (no gradient), L1's gradient far from it.
    at_zero = target.clone().requires_grad_()
    loss(at_zero, target).backward()
    assert torch.count_nonzero(at_zero.grad) == 0
    far = (target + torch.where(torch.rand_like(target) > 0.5, 10.0, -10.0)).requires_grad_()
    CharbonnierLoss(eps=1e-3)(far, target).backward()
    l1 = far.detach().clone().requires_grad_()
    torch.nn.functional.l1_loss(l1, target).backward()
    torch.testing.assert_close(far.grad, l1.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dataset", ["gopro", "realblur_j", "realblur_r"])
def test_hidiff_presets_hold_the_official_recipes(tmp_path, dataset):
    first = compose_train(tmp_path, f"experiment=hidiff_{dataset}_s1")
    second = compose_train(tmp_path, f"experiment=hidiff_{dataset}_s2", "model.stage1_ckpt=s1.ckpt")
    for cfg in (first, second):
        # HI-Diff's option files: global [64, 40, 32, 16, 8, 8] on 4 GPUs, phases of 20k then 200k iterations.
        # (the fourth value: the official per-GPU batch, each phase's cap per device)
        assert [list(phase) for phase in cfg.data.patch_schedule] == [
            [0, 128, 64, 16],
            [20000, 160, 40, 10],
            [40000, 192, 32, 8],
            [60000, 256, 16, 4],
            [80000, 320, 8, 2],
            [100000, 384, 8, 2],
        ]
        schedule = ProgressiveSchedule(cfg.data.patch_schedule)
        assert schedule.per_device_batches(4, 1) == [16, 10, 8, 4, 2, 2]
        plan = training_plan(cfg)  # trainer=gpu: one device
        assert plan.accumulation == 4 and [phase.micro_batch for phase in plan.phases] == [16, 10, 8, 4, 2, 2]
        cfg.trainer.accumulate_grad_batches = plan.accumulation
        assert cfg.trainer.val_check_interval == 4000 * 4
        assert cfg.model.optimizer.lr == 2e-4 and cfg.model.grad_clip_norm == 0.01 and cfg.trainer.max_steps == 300000
        assert cfg.model.net.transformer.ffn_expansion_factor == (2.66 if dataset == "gopro" else 2)
    diffusion = second.model.net.diffusion
    if dataset == "gopro":
        assert (diffusion.timesteps, diffusion.prediction, second.model.net.denoiser.block_num) == (8, "eps", 4)
    else:
        assert (diffusion.timesteps, diffusion.prediction, diffusion.clip_x0) == (16, "x0", False)
        assert second.model.net.denoiser._target_.endswith("MLPDenoiser")
        assert second.model.latent_encoder.activation == "lrelu" and first.model.net.latent_encoder.block_num == 5


def test_hidiff_ablation_presets_differ_only_where_the_paper_says(tmp_path):
    def compose(name):
        overrides = ["model.stage1_ckpt=s1.ckpt"] if name.endswith("s2") else []
        return compose_train(tmp_path, f"experiment=hidiff_ablation_{name}", *overrides)

    hidiff, single, split, baseline = compose("s2"), compose("single_guide_s2"), compose("split_s2"), compose("baseline")
    for cfg in (hidiff, single, split, baseline, compose("s1"), compose("single_guide_s1")):
        assert [list(phase) for phase in cfg.data.patch_schedule] == [[0, 192, 32, 8]]  # global batch 32, patch 192, 8 per GPU
        assert ProgressiveSchedule(cfg.data.patch_schedule).per_device_batches(4, 1) == [8]
        assert cfg.model.scheduler.eta_mins == [1e-6]
    assert hidiff.model.net.transformer.multi_scale_prior and not single.model.net.transformer.multi_scale_prior
    assert hidiff.model.joint_training and not split.model.joint_training
    assert baseline.model.net._target_.endswith("Restormer") and list(baseline.model.net.num_blocks) == [3, 5, 6, 6]
    assert baseline.trainer.max_steps == 2 * hidiff.trainer.max_steps


def test_diffusion_prior_presets_wire_the_pipeline(tmp_path):
    finetune = compose_train(tmp_path, "experiment=ldm_dpdd_decoder_finetune")
    assert finetune.model._target_.endswith("DecoderFinetuneStage") and finetune.model.pretrained_dir.endswith(
        "ldm-super-resolution-4x-openimages"
    )
    assert finetune.model.net.sampling_steps == 50 and finetune.model.net.beta_schedule == "scaled_linear"
    assert (finetune.model.net.beta_start, finetune.model.net.beta_end) == (0.0015, 0.0155)
    for steps in (5, 10, 20, 50):
        fused = compose_train(tmp_path, "experiment=swintormer_dpdd_prior", f"prior_steps={steps}")
        assert fused.data.prior_dir.endswith(f"DPDD_priors/T{steps}") and fused.model.net.inp_channels == 9
    for stage in ("ldm_autoencoder", "ldm_prior", "ldm_decoder_finetune"):
        quick = compose_train(tmp_path, "experiment=ldm_quick", f"model={stage}")
        assert list(quick.model.net.autoencoder.block_out_channels) == [16, 32, 32]
