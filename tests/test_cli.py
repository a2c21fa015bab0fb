"""The command-line entry points end to end, as a user runs them."""

import csv
import hashlib
import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST_TRAINER, TINY_SYNTHETIC, run_cli

from deblur_diffusion.data.io import read_image_raw

pytestmark = pytest.mark.slow


def checkout_commit() -> str:
    """git's own answer: the commit of this checkout, +dirty when tracked files differ from it."""
    root = Path(__file__).parents[1]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "HEAD", "--quiet"], cwd=root, check=False).returncode != 0
    return commit + ("+dirty" if dirty else "")


def train_args(tmp_path, *extra):
    return ["debug=tiny", f"paths.log_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "run"), *extra]


def test_train_writes_checkpoint_samples_and_table_then_resumes_from_its_step(tmp_path):
    # In its own process: what the console shows (Lightning's log lines, once) is under test.
    first = run_cli(
        "train", *train_args(tmp_path / "a", "hydra.run.dir=" + str(tmp_path / "a"), "report=true"), cwd=tmp_path, isolated=True
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "blurry input" in first.stdout and "PSNR" in first.stdout
    assert f"Run outputs: {tmp_path / 'a'}" in first.stdout
    run_log = (tmp_path / "a" / "train.log").read_text()
    assert "`Trainer.fit` stopped: `max_steps=4` reached" in run_log
    assert "│ PSNR" in run_log and f"Run outputs: {tmp_path / 'a'}" in run_log
    console = first.stdout + first.stderr
    assert console.count("`Trainer.fit` stopped") == 1 and console.count("[deblur_diffusion]") == 0
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert (tmp_path / "a" / "samples" / "latest.png").is_file()
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 4
    assert state["deblur_diffusion_config"]["model"]["net"]["dim"] == 8
    # What made it, against pip's metadata and git's own answer for this checkout.
    made_by = {"version": version("deblur-diffusion"), "commit": checkout_commit()}
    assert state["deblur_diffusion_provenance"] == made_by
    assert f"deblur-diffusion {made_by['version']} (commit {made_by['commit']})" in first.stdout
    exported = run_cli("export", f"ckpt={last}", f"out={tmp_path}/export", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    exported_record = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    assert exported_record["provenance"] == made_by and exported_record["source_sha256"] == digest
    scored = run_cli(
        "evaluate", f"ckpt={last}", "data=synthetic_tiny", "split=val", "lpips=false", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    scored_record = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert scored_record["provenance"] == made_by and scored_record["ckpt_sha256"] == digest
    # report=true (the quickstart's): the same evaluation of the same weights, with its report named.
    page = tmp_path / "a" / "evaluation" / "report.html"
    assert f"before and after: {page}" in " ".join(first.stdout.split())
    after_training = json.loads((tmp_path / "a" / "evaluation" / "summary.json").read_text())
    assert after_training["summary"] == json.loads((tmp_path / "eval" / "summary.json").read_text())["summary"]
    # evaluate experiment=<preset> scores on the preset's data (the quickstart's 8 validation pairs
    # of 96 px, not the synthetic data's 12 of 128), with the checkpoint's own network.
    preset = run_cli(
        "evaluate", "experiment=quickstart", f"ckpt={last}", "split=val", "lpips=false", f"hydra.run.dir={tmp_path}/preset", cwd=tmp_path
    )
    assert preset.returncode == 0, preset.stderr[-3000:]
    assert json.loads((tmp_path / "preset" / "summary.json").read_text())["summary"]["all"]["images"] == 8
    pictures = json.loads((tmp_path / "preset" / "report_images.json").read_text()).values()
    assert {read_image_raw(tmp_path / "preset" / picture["blurry"]).shape for picture in pictures} == {(96, 96, 3)}

    resumed = run_cli(
        "train",
        *train_args(tmp_path / "b", "hydra.run.dir=" + str(tmp_path / "b"), f"ckpt_path={last}", "trainer.max_steps=6"),
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6
    assert state["lr_schedulers"][0]["last_epoch"] == 6
    assert all(int(s["step"]) == 6 for s in state["optimizer_states"][0]["state"].values())
    with open(tmp_path / "b" / "csv" / "metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert steps and min(steps) >= 4


def test_unknown_override_fails_with_hydra_message(tmp_path):
    result = run_cli("train", "model.net.no_such_key=1", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not override 'model.net.no_such_key'" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("train", "model=no_such_model", cwd=tmp_path)
    assert result.returncode != 0 and "no_such_model" in result.stderr and "Traceback" not in result.stderr


def test_missing_dataset_fails_before_training_with_the_layout(tmp_path):
    result = run_cli("train", "data=gopro", f"paths.data_dir={tmp_path}/nowhere", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 1
    assert f"{tmp_path}/nowhere/GoPro/train" in result.stderr
    assert "Expected layout" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert f"{tmp_path}/nowhere/GoPro/train" in (tmp_path / "run" / "train.log").read_text()


def test_missing_required_value_is_named(tmp_path):
    result = run_cli("train", "data=folder", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 1
    assert "data.train.input_dir" in result.stderr and "Traceback" not in result.stderr


def test_summary_prints_the_dual_pixel_parameter_count(tmp_path):
    result = run_cli("summary", "model=restormer", "data=dpdd_dual", "height=32", "width=32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "26,132,548" in result.stdout and "1x6x32x32" in result.stdout


def test_synthesize_cli_writes_16_bit_gopro_layout(tmp_path):
    result = run_cli(
        "data.synthesize", f"out={tmp_path}/syn", "train_pairs=3", "test_pairs=2", "image_size=24", "bit_depth=16", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "syn" / "train" / "input").glob("*.png"))) == 3
    assert len(list((tmp_path / "syn" / "test" / "target").glob("*.png"))) == 2
    assert not list(tmp_path.glob("*.log")), "a tool that runs in the current folder must not leave a log file there"


def test_wandb_logger_runs_offline_without_an_account(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": "", "WANDB_MODE": "", "NETRC": str(tmp_path / "none")}
    result = run_cli("train", *train_args(tmp_path, "logger=wandb", "trainer.max_steps=2"), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb"))


TINY_SWINTORMER = [
    "model=swintormer",
    "model.net.dim=8",
    "model.net.num_blocks=[2,1,1,1]",
    "model.net.num_refinement_blocks=1",
    "model.net.heads=[1,1,1,1]",
    "model.net.window_size=4",
    "model.net.checkpoint_levels=official",
]


def test_swintormer_trains_with_perceptual_loss_and_tiled_validation(tmp_path):
    args = [
        *TINY_SWINTORMER,
        *TINY_SYNTHETIC,
        *FAST_TRAINER,
        "model/loss=l1_perceptual",
        "model.loss.losses.perceptual.pretrained=false",
        "inference=tiles",
        "inference.tile_size=24",
        "inference.stride=16",
        f"hydra.run.dir={tmp_path}/run",
    ]
    result = run_cli("train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    assert any(k.startswith("ema.module.latent.") for k in state["state_dict"])
    assert not any(k.startswith("loss.") for k in state["state_dict"])
    assert state["deblur_diffusion_config"]["inference"]["mode"] == "tiles"
