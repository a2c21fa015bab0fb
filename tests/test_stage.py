"""The regression training stage in process, with tiny models and data."""

import functools
from typing import ClassVar

import lightning as L
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from deblur_diffusion.data import DeblurDataModule, SyntheticPairs
from deblur_diffusion.loggers import resolve_wandb_mode
from deblur_diffusion.models import Restormer
from deblur_diffusion.stages import RegressionStage
from deblur_diffusion.stages.regression import NonFiniteLossError


def tiny_net():
    return Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1])


def tiny_data(batch=2):
    return DeblurDataModule(
        train=SyntheticPairs("train", length=16, image_size=40, kernel_size=5),
        val=SyntheticPairs("val", length=3, image_size=24, kernel_size=5),
        patch_schedule=[[0, 24, batch]],
        num_workers=0,
    )


def fit(stage, steps=3, accelerator="cpu", data=None, **trainer_options):
    trainer = L.Trainer(
        accelerator=accelerator,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **trainer_options,
    )
    trainer.fit(stage, datamodule=data or tiny_data())
    return trainer


class RecordingSGD(torch.optim.SGD):
    """Records the gradient norm the optimiser sees, i.e. after Lightning's clipping."""

    norms: ClassVar[list] = []

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        RecordingSGD.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        super().step()
        return loss


def test_gradients_are_clipped_to_the_configured_norm():
    RecordingSGD.norms = []
    stage = RegressionStage(tiny_net(), torch.nn.L1Loss(), functools.partial(RecordingSGD, lr=0.1), grad_clip_norm=1e-3)
    fit(stage, steps=3)
    assert len(RecordingSGD.norms) == 3
    assert max(RecordingSGD.norms) == pytest.approx(1e-3, rel=1e-3)


class RecordRawWeights(L.Callback):
    """The raw weights after every optimisation step (Lightning's global_step counts them), read
    from outside the stage."""

    def __init__(self):
        self.after_step = []

    def on_train_batch_end(self, trainer, stage, outputs, batch, batch_idx):
        if len(self.after_step) < trainer.global_step:
            self.after_step.append({key: value.detach().clone() for key, value in stage.net.state_dict().items()})


def test_the_ema_is_basicsr_model_ema_once_per_optimisation_step():
    # BasicSR (models/sr_model.py): net_g_ema starts as a copy of net_g (model_ema(decay=0)) and after
    # every optimizer.step() becomes decay * ema + (1 - decay) * net_g.
    torch.manual_seed(0)
    decay = 0.6
    stage = RegressionStage(tiny_net(), torch.nn.L1Loss(), functools.partial(torch.optim.SGD, lr=0.5), ema_decay=decay)
    expected = {key: value.clone() for key, value in stage.net.state_dict().items()}
    recorder = RecordRawWeights()
    fit(stage, steps=3, accumulate_grad_batches=2, callbacks=[recorder])
    assert len(recorder.after_step) == 3
    for weights in recorder.after_step:
        expected = {key: decay * expected[key] + (1 - decay) * weights[key] for key in expected}
    averaged = stage.ema.module.state_dict()
    assert not torch.equal(averaged["output.weight"], recorder.after_step[-1]["output.weight"])
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, rtol=0, atol=1e-6, msg=key)
    assert all(not p.requires_grad for p in stage.ema.parameters())
    image = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(stage(image), stage.ema.module(image))
    assert "ema.module.output.weight" in stage.state_dict()


def test_accumulated_micro_batches_give_the_ema_of_one_batch():
    def trained(accumulation):
        torch.manual_seed(0)
        stage = RegressionStage(tiny_net(), torch.nn.L1Loss(), functools.partial(torch.optim.SGD, lr=0.5), ema_decay=0.6)
        fit(stage, steps=3, data=tiny_data(batch=4), accumulate_grad_batches=accumulation)
        return stage.net.state_dict(), stage.ema.module.state_dict()

    raw_one, ema_one = trained(1)
    raw_two, ema_two = trained(2)
    for key in raw_one:
        torch.testing.assert_close(raw_two[key], raw_one[key], rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(ema_two[key], ema_one[key], rtol=0, atol=1e-6, msg=key)


def test_non_finite_loss_stops_with_the_step_and_images():
    class NaNLoss(torch.nn.Module):
        def forward(self, prediction, target):
            return (prediction - target).abs().mean() * float("nan")

    stage = RegressionStage(tiny_net(), NaNLoss(), functools.partial(torch.optim.AdamW, lr=1e-3))
    with pytest.raises(NonFiniteLossError, match=r"nan at step 0 on rank 0, images \['train_"):
        fit(stage, steps=2)


def test_validation_psnr_and_ssim_are_means_of_per_image_values():
    stage = RegressionStage(tiny_net(), torch.nn.L1Loss(), functools.partial(torch.optim.AdamW, lr=1e-3)).eval()
    data = tiny_data()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(stage, datamodule=data, verbose=False)[0]
    expected_restored, expected_input, expected_ssim = [], [], []
    for batch in data.val_dataloader():
        with torch.no_grad():
            restored = stage(batch["lq"]).clamp(0, 1)[0].numpy()
        gt = batch["gt"][0].numpy()
        expected_restored.append(peak_signal_noise_ratio(gt, restored, data_range=1.0))
        expected_input.append(peak_signal_noise_ratio(gt, batch["lq"][0].numpy(), data_range=1.0))
        expected_ssim.append(
            structural_similarity(
                gt, restored, channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
            )
        )
    assert metrics["val/psnr"] == pytest.approx(np.mean(expected_restored), abs=1e-4)
    assert metrics["val/psnr_input"] == pytest.approx(np.mean(expected_input), abs=1e-4)
    assert metrics["val/ssim"] == pytest.approx(np.mean(expected_ssim), abs=1e-4)


def test_wandb_mode_is_online_only_with_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    (tmp_path / "netrc").chmod(0o600)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match="mode"):
        resolve_wandb_mode("sometimes")


@pytest.mark.gpu
def test_bf16_mixed_precision_training_steps_on_cuda():
    stage = RegressionStage(tiny_net(), torch.nn.L1Loss(), functools.partial(torch.optim.AdamW, lr=1e-3), grad_clip_norm=0.01)
    trainer = fit(stage, steps=3, accelerator="gpu", devices=1, precision="bf16-mixed")
    assert trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in stage.net.parameters())
