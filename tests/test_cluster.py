"""Runs on a cluster: the run folder of a SLURM job or torchrun run, resuming a requeued job from
it, checkpoints on preemption, ranks that fail together, debug presets and Trainer switches."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_cli
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import OmegaConf

from deblur_diffusion.cli import config_dir
from deblur_diffusion.cluster import resume_checkpoint, run_id
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.models import Restormer

TESTS = str(Path(__file__).parent)
# What SLURM sets in a one-task batch job (sbatch --ntasks=1), as Lightning reads it.
ONE_TASK_JOB = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "deblur",
    "SLURM_NTASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "127.0.0.1",
}


def without_cluster(monkeypatch):
    for name in [*ONE_TASK_JOB, "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID"]:
        monkeypatch.delenv(name, raising=False)


def test_the_run_folder_is_named_by_the_job_that_every_rank_and_requeue_shares(monkeypatch):
    without_cluster(monkeypatch)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", run_id())
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "rdzv7")
    assert run_id() == "torchrun-rdzv7"
    for name, value in ONE_TASK_JOB.items():
        monkeypatch.setenv(name, value)
    assert run_id() == "slurm-4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_id() == "slurm-77_3"
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # srun --job-name=interactive bash: not a batch job
    assert run_id() == "torchrun-rdzv7"
    run_dir = OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "train.yaml").hydra.run)["dir"]
    assert run_dir.endswith("/runs/${run_id:}")


def test_auto_resume_takes_the_furthest_checkpoint_of_the_folder_whatever_the_file_times(tmp_path):
    assert resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 4, "epoch": 1}, tmp_path / "checkpoints" / "last.ckpt")
    torch.save({"global_step": 9, "epoch": 2}, tmp_path / "checkpoints" / "step0000009.ckpt")  # a best-so-far, not a resume point
    assert resume_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 6, "epoch": 1}, tmp_path / "hpc_ckpt_1.ckpt")  # written by Lightning's own SLURM handler
    # A rank that sees the later file with an older time (a network file system's cached view) picks it all the same.
    os.utime(tmp_path / "hpc_ckpt_1.ckpt", ns=(1, 1))
    assert resume_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(b"truncated")  # no resume point
    assert resume_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"


def test_torchrun_without_a_rendezvous_id_refuses_auto_resume_instead_of_starting_afresh(tmp_path, monkeypatch):
    from deblur_diffusion import train as train_module

    cfg = compose_config("train", tmp_path, "ckpt_path=auto")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setattr(train_module, "run_folder_given", lambda: False)
    with pytest.raises(ConfigError, match="torchrun without --rdzv-id"):
        train_module.checkpoint_to_resume(cfg, tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "gopro1")
    assert train_module.checkpoint_to_resume(cfg, tmp_path) is None  # a stable folder: nothing there yet


def tiny_official_weights(path):
    torch.manual_seed(3)
    torch.save({"params": Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1]).state_dict()}, path)
    return path


@pytest.mark.slow
def test_a_requeued_slurm_job_resumes_in_its_folder_and_ends_as_an_uninterrupted_run(tmp_path):
    init = tiny_official_weights(tmp_path / "released.pth")
    common = ["debug=tiny", "trainer.max_steps=6", "trainer.accumulate_grad_batches=2", "model.ema_decay=0.9", f"model.init_ckpt={init}"]
    env = {**ONE_TASK_JOB, "PYTHONPATH": TESTS}
    folder = tmp_path / "train" / "runs" / "slurm-4242"
    # The requeue signal arrives after micro-batch 4: within step 3, which is finished before saving.
    signal_mid_step = ["+callbacks.signal._target_=faults.SignalAtBatch", "+callbacks.signal.batch=4", "+callbacks.signal.signum=SIGUSR1"]
    first = run_cli("train", *common, f"paths.log_dir={tmp_path}", *signal_mid_step, cwd=tmp_path, env=env)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "SIGUSR1 received: stopped after step 3" in first.stderr and "requeue 4242" in first.stderr
    assert f"warm start: {init} (as net): loaded into net" in first.stdout.replace("\n", "")
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3

    second = run_cli("train", *common, f"paths.log_dir={tmp_path}", cwd=tmp_path, env=env)  # the requeued job
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"ckpt_path=auto: resuming from {folder / 'checkpoints' / 'last.ckpt'}" in second.stdout.replace("\n", "")
    assert "warm start" not in second.stdout  # the released weights are not laid over the resumed ones
    assert sorted(p.name for p in (tmp_path / "train" / "runs").iterdir()) == ["slurm-4242"]

    whole = run_cli("train", *common, f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path}/whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    final = {
        name: torch.load(path / "checkpoints" / "last.ckpt", weights_only=True)
        for name, path in (("whole", tmp_path / "whole"), ("resumed", folder))
    }
    assert final["whole"]["global_step"] == final["resumed"]["global_step"] == 6
    weights = {name: checkpoint["state_dict"] for name, checkpoint in final.items()}
    assert weights["whole"].keys() == weights["resumed"].keys() and any(k.startswith("ema.") for k in weights["whole"])
    assert all(torch.equal(weights["whole"][key], weights["resumed"][key]) for key in weights["whole"])


@pytest.mark.slow
def test_a_sigterm_saves_a_checkpoint_and_stops_without_requeueing(tmp_path):
    # Sent after step 2's checks of the preemption callback: seen at the end of step 3.
    signal_at = ["+callbacks.signal._target_=faults.SignalAtBatch", "+callbacks.signal.batch=1"]
    result = run_cli("train", "debug=tiny", f"hydra.run.dir={tmp_path}/run", *signal_at, cwd=tmp_path, env={"PYTHONPATH": TESTS})
    assert result.returncode == 1
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"SIGTERM received: stopped after step 3 with its checkpoint saved to {last}; resume with ckpt_path={last}" in result.stderr
    assert "requeue" not in result.stderr
    assert torch.load(last, weights_only=True)["global_step"] == 3


@pytest.mark.slow
def test_a_nan_on_one_of_two_ranks_stops_both(tmp_path):
    nan_on_rank_one = ["model.loss._target_=faults.NonFiniteOnRank", "+model.loss.rank=1", "+model.loss.call=1"]
    start = time.monotonic()
    result = run_cli(
        "train",
        "debug=tiny",
        "trainer=ddp_sim",
        *nan_on_rank_one,
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
        env={"PYTHONPATH": TESTS},
        timeout=120,
    )
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert re.search(r"training loss is nan at step 1 on rank 1, images \['train_\d+'\]", output), output[-3000:]
    assert "rank 0 stops because rank 1 failed at step 1" in output
    assert elapsed < 60, elapsed  # not the process group's 30-minute timeout
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False)
    assert not left.stdout.strip(), f"ranks still running: {left.stdout}"


@pytest.mark.slow
def test_ranks_resumed_from_different_steps_all_stop_before_training(tmp_path):
    result = run_cli(
        "train",
        "debug=tiny",
        "trainer=ddp_sim",
        "callbacks=none",
        "+callbacks.fault._target_=faults.ResumedElsewhereOnRank",
        "+callbacks.fault.rank=1",
        "+callbacks.fault.step=5",
        "+callbacks.check._target_=deblur_diffusion.cluster.SameResumePoint",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
        env={"PYTHONPATH": TESTS},
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "the ranks resume from different checkpoints (rank 0: step 0, rank 1: step 5;" in output, output[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["default", "fdr", "overfit", "limit", "profiler"])
def test_every_debug_preset_runs_with_any_model_and_data(tmp_path, preset):
    tiny = ["model=restormer_tiny", "data=synthetic_tiny", "data.patch_schedule=[[0,32,2]]"]
    short = [] if preset in ("fdr", "limit") else ["trainer.max_steps=3"]
    # The profiler's report is printed through a logging handler Lightning sets up at import: a process of its own.
    result = run_cli(
        "train", f"debug={preset}", *tiny, *short, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, isolated=preset == "profiler"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if preset == "profiler":
        assert "FIT Profiler Report" in result.stdout + result.stderr


@pytest.mark.slow
def test_trainer_switches_override_without_a_plus_and_plain_progress_prints_lines(tmp_path):
    result = run_cli("train", "debug=tiny", "trainer.fast_dev_run=1", f"hydra.run.dir={tmp_path}/fdr", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = run_cli(
        "train", "debug=tiny", "callbacks=plain", "trainer.log_every_n_steps=2", f"hydra.run.dir={tmp_path}/plain", cwd=tmp_path
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert re.search(r"^step 2/4: [\d.]+ steps/s, [\d.]+ min left; train/loss [\d.]+", plain.stdout, re.MULTILINE), plain.stdout
    assert re.search(r"^validation after step 4: .*val/psnr [\d.]+", plain.stdout, re.MULTILINE), plain.stdout
    assert re.search(r"^validation \(closing\): .*val/psnr [\d.]+", plain.stdout, re.MULTILINE)


def test_callbacks_none_leaves_no_callback_and_debug_tiny_composes_with_folder_data(tmp_path):
    cfg = compose_config("train", tmp_path, "debug=tiny", "callbacks=none")
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False)
    assert not [c for c in trainer.callbacks if isinstance(c, (ModelCheckpoint, ProgressBar))], trainer.callbacks
    folder = compose_config("train", tmp_path, "debug=tiny", "data=folder")
    assert "length" not in folder.data.train and folder.data.patch_schedule == [[0, 32, 2]]
    assert folder.model.net.dim == 8  # the tiny model stays


def test_the_progress_bar_title_of_a_step_based_run():
    from types import SimpleNamespace

    from deblur_diffusion.callbacks import StepProgressBar

    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


@pytest.mark.slow
def test_the_gpu_check_script_runs_every_code_path_on_a_cpu_dry_run(tmp_path):
    """What the GPU machine will run, on a CPU first: every row kind (data-fed and fixed batch, the
    compiled rows through the eager backend), the official-code ratio, the channel attention
    micro-benchmark, the JSON and the tables. The official files here are stand-ins that build
    this package's networks (the real ones are fetched onto the GPU machine, never committed)."""
    reference = tmp_path / "reference"
    for relative, name in (
        ("Restormer/basicsr/models/archs/restormer_arch.py", "Restormer"),
        ("HI-Diff/hi_diff/archs/Transformer_arch.py", "PriorGuidedRestormer as Transformer"),
        ("swintormer/basicsr/archs/Swintormer_arch.py", "Swintormer"),
    ):
        (reference / relative).parent.mkdir(parents=True, exist_ok=True)
        (reference / relative).write_text(f"from deblur_diffusion.models import {name}\n")
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    result = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--out", str(tmp_path / "out"), "--reference", str(reference)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert not record["failed"], record["failed"]
    assert "running" not in record and record["compile_smoke_test"]["ok"]
    rows = {(row["network"], row["variant"]) for row in record["rows"]}
    variants = ("fp32 (TF32)", "bf16-mixed", "bf16-mixed channels-last", "bf16-mixed channels-last compile")
    assert rows == {(n, v) for n in ("restormer", "swintormer", "hidiff_s2") for v in variants}
    for row in record["rows"]:
        assert row["images_per_second"] > 0 and row["fixed_batch_images_per_second"] > 0 and row["training_gflops_per_image"] > 0
    assert [r["network"] for r in record["official"]] == ["restormer", "swintormer", "hidiff_s2"]
    assert all(r["package_speed_vs_official"] > 0 for r in record["official"])
    attention = {(r["level"], r["dtype"]) for r in record["channel_attention"]}
    assert attention == {(level, dtype) for level in ("level 1", "level 2", "level 3", "latent") for dtype in ("float32", "bfloat16")}
    assert record["environment"]["tf32"] is True and "dev_shm_gib" in record["environment"]
    report = (tmp_path / "out" / "results.md").read_text()
    assert report.startswith("| network | variant | images/s | fixed batch images/s") and "| level | dtype |" in report


def test_overfit_batches_repeat_the_same_batches_every_epoch(tmp_path):
    from types import SimpleNamespace

    datamodule = instantiate(compose_config("train", tmp_path, "debug=tiny").data)
    trainer = SimpleNamespace(accumulate_grad_batches=1, global_step=0, overfit_batches=3, global_rank=0, world_size=1)
    datamodule.trainer = trainer

    def epoch(step):
        trainer.global_step = step  # where the trainer stands when the epoch's loader starts
        return [batch for _, batch in zip(range(3), datamodule.train_batch_sampler(), strict=False)]

    assert epoch(0) == epoch(3) == epoch(6)
    trainer.overfit_batches = 0
    assert epoch(0) != epoch(3)  # a normal run moves on with the step


def test_auto_resume_refuses_another_runs_checkpoint_and_prefers_the_jobs_own_progress(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from deblur_diffusion.errors import ConfigError
    from deblur_diffusion.train import checkpoint_to_resume

    without_cluster(monkeypatch)
    cfg = compose_config("train", tmp_path, "debug=tiny", "ckpt_path=auto")
    (tmp_path / "checkpoints").mkdir()
    saved = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"deblur_diffusion_config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)}, saved)  # as train saves it
    assert checkpoint_to_resume(cfg, tmp_path) == str(saved)
    other = compose_config("train", tmp_path, "debug=tiny", "ckpt_path=auto", "model.net.dim=16")
    with pytest.raises(ConfigError, match=r"belongs to another run of this job's folder: model.net.dim \(8 there, 16 now\)"):
        checkpoint_to_resume(other, tmp_path)
    # A job submitted with an explicit ckpt_path resumes, once requeued, from its own progress.
    earlier = tmp_path / "earlier.ckpt"
    earlier.write_bytes(b"")
    explicit = compose_config("train", tmp_path, "debug=tiny", f"ckpt_path={earlier}")
    assert checkpoint_to_resume(explicit, tmp_path) == str(earlier)  # outside a job: as given
    for name, value in ONE_TASK_JOB.items():
        monkeypatch.setenv(name, value)
    assert checkpoint_to_resume(explicit, tmp_path) == str(saved)
