"""What training steps receive, through Lightning with data workers: the progressive phase follows
the global step across epochs, ranks get different pixels, and a resumed run sees the batches and
random state of an uninterrupted one."""

from types import SimpleNamespace
from typing import ClassVar

import lightning as L
import pytest
import torch
from conftest import TINY_RESTORMER, compose_config

from deblur_diffusion.data import DeblurDataModule, SyntheticPairs
from deblur_diffusion.data.schedule import ProgressiveSchedule
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.train import train

SCHEDULE = [[0, 16, 4], [3, 24, 2], [7, 32, 2]]


class BatchProbe(L.Callback):
    """Records, for every training batch, the step, patch size, sample seeds, pixels and a random draw."""

    records: ClassVar[list] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        BatchProbe.records.append(
            {
                "step": trainer.global_step,
                "patch": batch["lq"].shape[-1],
                "seeds": batch["seed"].tolist(),
                "pixels": batch["lq"].double().sum().item(),
                # A draw, as diffusion noise in a training step would make.
                "noise": torch.rand(1).item(),
            }
        )


def run(tmp_path, name, *overrides):
    BatchProbe.records = []
    cfg = compose_config(
        "train",
        tmp_path,
        *TINY_RESTORMER,
        "data.train.length=8",
        "data.train.image_size=40",
        "data.val.length=1",
        "data.val.image_size=32",
        f"data.patch_schedule={SCHEDULE}".replace(" ", ""),
        "data.num_workers=2",
        "trainer=cpu",
        "trainer.log_every_n_steps=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.val_check_interval=4",
        "test=false",
        "callbacks=none",
        "trainer.enable_checkpointing=true",  # for the one checkpoint callback added back
        "+callbacks.probe._target_=test_training_data.BatchProbe",
        "+callbacks.last._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.last.dirpath={tmp_path}/{name}/ckpt",
        "+callbacks.last.save_last=true",
        "+callbacks.last.save_top_k=0",
        *overrides,
        output_dir=tmp_path / name,
    )
    train(cfg)
    return list(BatchProbe.records)


def test_the_phase_follows_the_global_step_and_a_resumed_run_sees_the_same_batches(tmp_path):
    uninterrupted = run(tmp_path, "whole", "trainer.max_steps=10")
    schedule = ProgressiveSchedule(SCHEDULE)
    # Epochs are 2 steps long here, so this crosses four epoch ends and two phase changes with workers prefetching.
    assert [r["step"] for r in uninterrupted] == list(range(10))
    assert [r["patch"] for r in uninterrupted] == [schedule.at(step).patch_size for step in range(10)]
    assert [len(r["seeds"]) for r in uninterrupted] == [schedule.at(step).batch_size for step in range(10)]
    run(tmp_path, "first", "trainer.max_steps=5")
    resumed = run(tmp_path, "second", "trainer.max_steps=10", f"ckpt_path={tmp_path}/first/ckpt/last.ckpt")
    assert [r["step"] for r in resumed] == list(range(5, 10))
    assert resumed == uninterrupted[5:]


def test_two_ranks_receive_different_pixels_and_random_states():
    received = []
    for rank in (0, 1):
        data = DeblurDataModule(
            train=SyntheticPairs("train", length=16, image_size=32, kernel_size=5), patch_schedule=[[0, 16, 4]], num_workers=0, seed=3
        )
        data.trainer = SimpleNamespace(
            global_rank=rank, world_size=2, global_step=0, accumulate_grad_batches=1, overfit_batches=0, training=True
        )
        torch.manual_seed(3)  # seed_everything gives every rank the same state
        batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
        received.append((batch, torch.rand(4)))
    (first, noise_first), (second, noise_second) = received
    assert first["lq"].shape == second["lq"].shape == (2, 3, 16, 16)
    assert not set(first["name"]) & set(second["name"])
    assert not torch.equal(first["lq"], second["lq"]) and not torch.equal(noise_first, noise_second)


def test_a_training_set_smaller_than_a_batch_stops_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train has 4 pairs, fewer than one micro-batch step needs: 8"):
        run(tmp_path, "small", "data.train.length=4", "data.patch_schedule=[[0,16,8]]", "trainer.max_steps=2")


def test_a_run_resumed_between_accumulated_steps_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    accumulated = ["trainer.accumulate_grad_batches=2", "model.ema_decay=0.9"]
    uninterrupted = run(tmp_path, "whole", "trainer.max_steps=6", *accumulated)
    assert [r["step"] for r in uninterrupted] == [step for step in range(6) for _ in range(2)]  # two micro-batches a step
    run(tmp_path, "first", "trainer.max_steps=3", *accumulated)
    resumed = run(tmp_path, "second", "trainer.max_steps=6", *accumulated, f"ckpt_path={tmp_path}/first/ckpt/last.ckpt")
    assert resumed == uninterrupted[6:]
    final = {name: torch.load(tmp_path / name / "ckpt" / "last.ckpt", weights_only=True) for name in ("whole", "second")}
    assert final["whole"]["global_step"] == final["second"]["global_step"] == 6
    weights = {name: checkpoint["state_dict"] for name, checkpoint in final.items()}
    assert any(key.startswith("ema.module.") for key in weights["whole"])
    assert weights["whole"].keys() == weights["second"].keys()
    assert all(torch.equal(weights["whole"][key], weights["second"][key]) for key in weights["whole"])
