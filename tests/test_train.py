"""``train(cfg)`` in process, on configs composed from conf/ as the CLI does."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import FAST_TRAINER, REPO_ROOT, TINY_RESTORMER, TINY_SYNTHETIC
from deblur_diffusion.losses import CharbonnierLoss
from deblur_diffusion.train import train


def compose_train(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(
            "train", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", *overrides]
        )


def test_train_returns_the_monitored_metric_and_logs_to_tensorboard(tmp_path):
    cfg = compose_train(
        tmp_path, *TINY_RESTORMER, *TINY_SYNTHETIC, *FAST_TRAINER, "logger=[csv,tensorboard]", "model/loss=charbonnier", "model.ema_decay=0.9"
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


def test_swintormer_dpdd_preset_holds_the_paper_settings(tmp_path):
    cfg = compose_train(tmp_path, "experiment=swintormer_dpdd")
    assert cfg.model.net.inp_channels == 6 and list(cfg.data.train.views) == ["r", "l"]
    assert cfg.model.optimizer.lr == 3e-4 and cfg.model.optimizer.weight_decay == 1e-4
    assert cfg.model.scheduler.eta_mins[-1] == 1e-6 and cfg.model.ema_decay == 0.999
    assert cfg.model.grad_clip_norm == 0.01 and list(cfg.data.patch_schedule) == [[0, 256, 9]]
    assert cfg.inference.mode == "tiles" and (cfg.inference.tile_size, cfg.inference.stride) == (256, 220)


def test_swintormer_single_image_preset_reads_the_combined_view(tmp_path):
    cfg = compose_train(tmp_path, "experiment=swintormer_dpdd_single")
    assert cfg.model.net.inp_channels == 3 and list(cfg.data.train.views) == ["c"]
    assert cfg.inference.mode == "tiles" and cfg.model.ema_decay == 0.999


@pytest.mark.parametrize("data", ["dpdd", "dpdd_dual"])
def test_swintormer_on_dpdd_composes_with_matching_channels(tmp_path, data):
    cfg = compose_train(tmp_path, "model=swintormer", f"data={data}")
    assert cfg.model.net.inp_channels == (6 if data == "dpdd_dual" else 3)


def test_charbonnier_matches_its_formula():
    prediction, target = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    expected = torch.sqrt((prediction - target) ** 2 + 1e-6).mean()
    torch.testing.assert_close(CharbonnierLoss(eps=1e-3)(prediction, target), expected)
