"""Global batches that follow the world size: every preset planned on 1 to 16 devices (or refused
naming the counts that work), the official per-GPU batches where the official device counts are
used, and 2 and 4 ranks training a paper preset to the weights of one process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_RESTORMER, compose_config, run_cli

from deblur_diffusion.cli import config_dir
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.planning import training_plan

PRESETS = sorted(path.stem for path in (Path(config_dir()) / "experiment").glob("*.yaml"))
DEVICE_COUNTS = (1, 2, 4, 8, 16)
# Presets that serve several models and need one named.
NEEDS = {"ldm_quick": ["model=ldm_autoencoder"]}


def plan_of(tmp_path, preset: str, devices: int, *overrides: str):
    chosen = [f"experiment={preset}", *NEEDS.get(preset, []), "trainer=ddp", f"trainer.devices={devices}"]
    return training_plan(compose_config("train", tmp_path, *chosen, *overrides))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_planned_on_any_device_count_or_refused_naming_those_that_work(tmp_path, preset):
    for devices in DEVICE_COUNTS:
        try:
            plan = plan_of(tmp_path, preset, devices)
        except ConfigError as refusal:
            workable = [int(n) for n in re.search(r"device counts that can: ([\d, ]+)\.", str(refusal)).group(1).split(", ")]
            assert devices not in workable
            for count in workable:  # each named count really plans
                assert plan_of(tmp_path, preset, count).world_size == count
            continue
        assert plan.world_size == devices
        for phase in plan.phases:
            assert phase.micro_batch * devices * plan.accumulation == phase.global_batch


def test_the_official_device_counts_get_the_official_per_gpu_batches(tmp_path):
    # REFERENCE.md: Restormer ran on 8 GPUs with per-GPU [8, 5, 4, 2, 1, 1]; HI-Diff on 4 GPUs with
    # the same global batches [64, 40, 32, 16, 8, 8], i.e. per-GPU [16, 10, 8, 4, 2, 2].
    restormer = {n: plan_of(tmp_path, "restormer_gopro", n) for n in (1, 4, 8)}
    assert [p.global_batch for p in restormer[8].phases] == [64, 40, 32, 16, 8, 8]
    for devices, accumulation in ((1, 8), (4, 2), (8, 1)):
        assert restormer[devices].accumulation == accumulation
        assert [p.micro_batch for p in restormer[devices].phases] == [8, 5, 4, 2, 1, 1]
    assert [p.steps for p in restormer[8].phases] == [92000, 64000, 48000, 36000, 36000, 24000]
    hidiff = plan_of(tmp_path, "hidiff_gopro_s2", 4)
    assert hidiff.accumulation == 1 and [p.micro_batch for p in hidiff.phases] == [16, 10, 8, 4, 2, 2]
    assert plan_of(tmp_path, "hidiff_gopro_s2", 1).accumulation == 4
    with pytest.raises(ConfigError, match=r"global batches \[11\] .* over 2 devices .* device counts that can: 1, 11\."):
        plan_of(tmp_path, "swintormer_dpdd", 2)
    nodes = training_plan(
        compose_config("train", tmp_path, "experiment=restormer_gopro", "trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2")
    )
    assert nodes.world_size == 4 and nodes.accumulation == 2


def test_train_refuses_an_impossible_split_before_reading_any_data(tmp_path):
    from deblur_diffusion.train import train

    cfg = compose_config(
        "train", tmp_path, "experiment=swintormer_dpdd", "trainer=ddp", "trainer.devices=4", f"paths.data_dir={tmp_path}/none"
    )
    with pytest.raises(ConfigError, match="cannot be split evenly over 4 devices"):
        train(cfg)  # DPDD is not there: the plan is checked first


def test_the_summary_prints_the_plan_for_a_device_count(tmp_path):
    result = run_cli(
        "summary", "experiment=restormer_gopro", "trainer=ddp", "trainer.devices=4", f"paths.data_dir={tmp_path}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Training plan: 4 devices, 2 micro-batches per step" in result.stdout
    assert re.search(r"0-92,000 .* 128 .* 64 .* 8 .* 2 .* 5,888,000", result.stdout)


@pytest.mark.slow
def test_two_and_four_gloo_ranks_train_a_paper_preset_to_the_weights_of_one_process(tmp_path):
    assert (
        run_cli("data.synthesize", f"out={tmp_path}/GoPro", "train_pairs=16", "test_pairs=2", "image_size=40", cwd=tmp_path).returncode == 0
    )
    common = [
        "experiment=restormer_gopro",
        *TINY_RESTORMER,
        f"paths.data_dir={tmp_path}",
        # The preset's recipe at a size a CPU trains in seconds: global batches 8 then 4, at most
        # 2 and 1 samples per device.
        "data.patch_schedule=[[0,32,8,2],[2,32,4,1]]",
        "data.num_workers=0",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "test=false",
        "optimized_metric=null",
        "callbacks=none",
        "trainer.enable_checkpointing=true",
        "+callbacks.last._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.last.save_last=true",
        "+callbacks.last.save_top_k=0",
    ]
    weights = {}
    for devices, trainer in ((1, "trainer=cpu"), (2, "trainer=ddp_sim"), (4, "trainer=ddp_sim")):
        run = tmp_path / f"ranks{devices}"
        result = run_cli(
            "train",
            *common,
            trainer,
            f"trainer.devices={devices}",
            f"+callbacks.last.dirpath={run}/ckpt",
            f"hydra.run.dir={run}",
            cwd=tmp_path,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        accumulation = {1: 4, 2: 2, 4: 1}[devices]
        assert f"Training plan: {devices} device" in result.stdout and f"{accumulation} micro-batch" in result.stdout
        checkpoint = torch.load(run / "ckpt" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == 4
        weights[devices] = checkpoint["state_dict"]
    changed = [key for key in weights[1] if key.startswith("net.") and weights[1][key].dtype.is_floating_point]
    for devices in (2, 4):
        for key in changed:
            torch.testing.assert_close(weights[devices][key], weights[1][key], rtol=1e-5, atol=1e-6, msg=f"{devices} ranks: {key}")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimized_metric=val/psnrr"], r"optimized_metric='val/psnrr' is not a metric this model logs: val/psnr, val/ssim"),
        (["optimized_metric=test/psnr", "test=false"], r"optimized_metric='test/psnr' is not a metric"),
        (["report=true", "callbacks=none"], r"report=true evaluates a saved checkpoint"),
        (["report=true", "callbacks.model_checkpoint.save_last=false"], r"keep callbacks.model_checkpoint.save_last=true"),
    ],
)
def test_what_train_reads_after_fit_is_checked_before_the_first_step(tmp_path, monkeypatch, overrides, message):
    import lightning as L

    from deblur_diffusion.train import train

    def fit_not_started(*args, **kwargs):
        raise AssertionError("training started before the settings it ends with were checked")

    monkeypatch.setattr(L.Trainer, "fit", fit_not_started)
    cfg = compose_config("train", tmp_path, "debug=tiny", *overrides)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
