"""Sweeps, distributed data, mixed precision, activation checkpointing and the notebooks."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import torch
import yaml
from conftest import FAST_TRAINER, REPO_ROOT, TINY_RESTORMER, TINY_SYNTHETIC, compose_config, run_cli
from nbclient import NotebookClient
from test_latent_prior import tiny_model

from deblur_diffusion.data import DeblurDataModule, SyntheticPairs
from deblur_diffusion.loggers import run_name_and_tags
from deblur_diffusion.models import (
    HIDiff,
    HIDiffStageOneNet,
    LatentEncoder,
    MixerDenoiser,
    PriorDiffusion,
    PriorGuidedRestormer,
    Restormer,
    Swintormer,
)
from deblur_diffusion.stages import (
    AutoencoderStage,
    DecoderFinetuneStage,
    HIDiffStageOne,
    HIDiffStageTwo,
    LatentDiffusionStage,
    RegressionStage,
)

ODD_VALIDATION = [o for o in TINY_SYNTHETIC if not o.startswith("data.val.length")] + ["data.val.length=3"]


def last_validation(run_dir: Path) -> dict:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/psnr")]
    return {key: float(value) for key, value in rows[-1].items() if key.startswith("val/") and value}


@pytest.mark.slow
def test_ddp_sim_validates_each_image_once_like_a_single_process(tmp_path):
    single = run_cli(
        "train", *TINY_RESTORMER, *ODD_VALIDATION, *FAST_TRAINER, "test=false", f"hydra.run.dir={tmp_path}/single", cwd=tmp_path
    )
    assert single.returncode == 0, single.stderr[-3000:]
    checkpoint = next((tmp_path / "single" / "checkpoints").glob("step*.ckpt"))
    distributed = run_cli(
        "train",
        *TINY_RESTORMER,
        *ODD_VALIDATION,
        *FAST_TRAINER,
        "trainer=ddp_sim",
        f"ckpt_path={checkpoint}",
        "test=false",
        f"hydra.run.dir={tmp_path}/ddp",
        cwd=tmp_path,
    )
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    expected, measured = last_validation(tmp_path / "single"), last_validation(tmp_path / "ddp")
    for metric in ("val/psnr", "val/ssim", "val/psnr_input"):
        assert measured[metric] == pytest.approx(expected[metric], abs=1e-5), metric


@pytest.mark.slow
def test_ddp_sim_trains_and_rank_zero_writes_the_outputs(tmp_path):
    result = run_cli(
        "train",
        "debug=tiny",
        "trainer=ddp_sim",
        "test=false",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()} == {"step0000004.ckpt", "last.ckpt"}
    assert (tmp_path / "run" / "samples" / "latest.png").is_file()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def shard(world_size: int, rank: int, split: str):
    data = DeblurDataModule(
        train=SyntheticPairs("train", length=20, image_size=24, kernel_size=5),
        val=SyntheticPairs("val", length=5, image_size=24, kernel_size=5),
        patch_schedule=[[0, 16, 2]],
        num_workers=0,
    )
    data.trainer = SimpleNamespace(
        global_rank=rank, world_size=world_size, global_step=0, accumulate_grad_batches=1, overfit_batches=0, training=True
    )
    loader = data.train_dataloader() if split == "train" else data.val_dataloader()
    if split == "train":
        return [key.index for batch in loader.batch_sampler for key in batch]
    return list(loader.sampler)


def test_each_rank_draws_a_distinct_shard_and_evaluates_distinct_images():
    first, second = shard(2, 0, "train"), shard(2, 1, "train")
    assert len(first) == len(second) == 10 and not set(first) & set(second)
    assert sorted(first + second) == list(range(20))
    val = [shard(2, rank, "val") for rank in (0, 1)]
    assert sorted(val[0] + val[1]) == list(range(5)) and not set(val[0]) & set(val[1])


@pytest.mark.slow
def test_optuna_search_runs_two_trials_and_reports_the_best(tmp_path):
    result = run_cli(
        "train",
        "-m",
        "hparams_search=regression",
        *TINY_RESTORMER,
        *[o for o in TINY_SYNTHETIC if "patch_schedule" not in o],
        *FAST_TRAINER,
        "test=false",
        "hydra.sweeper.n_trials=2",
        "sweep.patch_size=choice(24,32)",
        "sweep.batch_size=2",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    trials = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert trials == ["0", "1"]
    for trial in trials:
        assert (tmp_path / "sweep" / trial / "train.log").read_text().count("`Trainer.fit` stopped") == 1, f"trial {trial}'s log"
    values = [last_validation(tmp_path / "sweep" / t)["val/psnr"] for t in trials]
    assert results["best_value"] == pytest.approx(max(values), abs=1e-4)
    assert set(results["best_params"]) == {"model.optimizer.lr", "model.optimizer.weight_decay", "sweep.patch_size"}


def expand_wandb_command(spec: dict, parameters: dict) -> list[str]:
    """W&B's command macros for one parameter set (the agent's behaviour, documented by W&B)."""
    command = []
    for part in spec["command"]:
        if part == "${env}":
            command.append("/usr/bin/env")
        elif part == "${interpreter}":
            command.append(sys.executable)
        elif part == "${args_no_hyphens}":
            command += [f"{key}={value}" for key, value in parameters.items()]
        else:
            command.append(part)
    return command


@pytest.mark.slow
def test_the_wandb_sweep_runs_one_trial_of_the_hydra_entry_point(tmp_path):
    spec = yaml.safe_load((REPO_ROOT / "experiments" / "sweeps" / "wandb_regression.yaml").read_text())
    parameters = {name: (options["values"][0] if "values" in options else options["min"]) for name, options in spec["parameters"].items()}
    parameters["data.patch_schedule"] = "[[0,32,2]]"
    command = expand_wandb_command(spec, parameters)
    assert command[:4] == ["/usr/bin/env", sys.executable, "-m", "deblur_diffusion.train"] and "logger=[csv,wandb]" in command
    fixed = [
        *TINY_RESTORMER,
        *[o for o in TINY_SYNTHETIC if "patch_schedule" not in o],
        *FAST_TRAINER,
        "test=false",
        f"hydra.run.dir={tmp_path}/trial",
    ]
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "WANDB_API_KEY": "",
        "WANDB_MODE": "",
        "NETRC": str(tmp_path / "none"),
        "PYTHONUNBUFFERED": "1",
    }
    result = subprocess.run([*command, *fixed], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "trial" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The csv logger stays beside W&B: what notebooks/inspect_results.ipynb reads.
    assert "val/psnr" in (tmp_path / "trial" / "csv" / "metrics.csv").read_text().splitlines()[0]
    applied = yaml.safe_load((tmp_path / "trial" / ".hydra" / "config.yaml").read_text())
    assert applied["model"]["optimizer"]["lr"] == parameters["model.optimizer.lr"]
    assert applied["model"]["optimizer"]["weight_decay"] == parameters["model.optimizer.weight_decay"]


def test_wandb_runs_are_named_and_tagged_by_what_they_change():
    overrides = ["model.optimizer.lr=0.0012", "data.patch_schedule=[[0,128,8]]", "logger=[csv,wandb]", "hydra.run.dir=/x", "+paths.a=b"]
    name, tags = run_name_and_tags("train", overrides)
    assert name == "train lr=0.0012 patch_schedule=[[0,128,8]]"
    assert tags == ["model.optimizer.lr=0.0012", "data.patch_schedule=[[0,128,8]]"]
    assert all(len(tag) <= 64 for tag in run_name_and_tags("train", ["model.net.x=" + "9" * 80])[1])


@pytest.mark.slow
def test_an_optuna_search_resumes_from_its_sqlite_study(tmp_path):
    search = [
        "-m",
        "hparams_search=regression",
        *TINY_RESTORMER,
        *[o for o in TINY_SYNTHETIC if "patch_schedule" not in o],
        *FAST_TRAINER,
        "test=false",
        "hydra.sweeper.n_trials=1",
        "sweep.patch_size=32",
        "sweep.batch_size=2",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db",
        "hydra.sweeper.study_name=resumed",
    ]
    for attempt in ("first", "second"):
        result = run_cli("train", *search, f"hydra.sweep.dir={tmp_path}/{attempt}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    import optuna

    studies = optuna.get_all_study_summaries(storage=f"sqlite:///{tmp_path}/study.db")
    assert [(study.study_name, study.n_trials) for study in studies] == [("resumed", 2)]
    trials = optuna.load_study(study_name="resumed", storage=f"sqlite:///{tmp_path}/study.db").trials
    assert all(trial.state == optuna.trial.TrialState.COMPLETE and trial.value > 0 for trial in trials)


def tiny_batch(channels=3):
    return {"lq": torch.rand(2, channels, 32, 32), "gt": torch.rand(2, 3, 32, 32), "name": ["a", "b"]}


def tiny_hidiff_transformer():
    return PriorGuidedRestormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1], embed_dim=8)


def stages(**options):
    adam = torch.optim.AdamW
    l1 = torch.nn.L1Loss()
    tiny = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1])
    return {
        "restormer": RegressionStage(Restormer(**tiny), l1, adam, **options),
        "swintormer": RegressionStage(Swintormer(inp_channels=3, window_size=4, **tiny), l1, adam, **options),
        "hidiff_s1": HIDiffStageOne(
            HIDiffStageOneNet(tiny_hidiff_transformer(), LatentEncoder(embed_dim=8, block_num=1)), l1, adam, **options
        ),
        "hidiff_s2": HIDiffStageTwo(
            HIDiff(tiny_hidiff_transformer(), LatentEncoder(3, 8, 1, stage=2), MixerDenoiser(32, 32, 16, 3), PriorDiffusion()),
            LatentEncoder(embed_dim=8, block_num=1),
            l1,
            adam,
            **options,
        ),
        "ldm_autoencoder": AutoencoderStage(tiny_model(), l1, adam, **options),
        "ldm_prior": LatentDiffusionStage(tiny_model(), l1, adam, **options),
        "ldm_decoder_finetune": DecoderFinetuneStage(tiny_model(), l1, adam, **options),
    }


@pytest.mark.parametrize("name", list(stages()))
def test_one_bf16_autocast_step_on_cpu(name):
    stage = stages()[name]
    optimizer = stage.configure_optimizers()
    batch = tiny_batch()
    torch.manual_seed(0)
    full_precision = sum(stage.training_losses(batch).values()).item()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum(stage.training_losses(batch).values())
    # The same loss to bf16's precision (8 bits of mantissa), not merely a finite one.
    assert loss.item() == pytest.approx(full_precision, rel=0.05)
    loss.backward()
    trainable = {id(p) for p in stage.trainable_parameters()}
    names = [name for name, p in stage.named_parameters() if id(p) in trainable]
    without_gradient = [name for name, p in stage.named_parameters() if id(p) in trainable and p.grad is None]
    assert names and not without_gradient
    assert all(torch.isfinite(p.grad).all() for p in stage.trainable_parameters())
    before = [p.detach().clone() for p in stage.trainable_parameters()]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, stage.trainable_parameters(), strict=True))


def execute(notebook: Path, env: dict) -> nbformat.NotebookNode:
    nb = nbformat.read(notebook, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit notebooks without outputs"
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb


def text_outputs(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_the_notebooks_run_top_to_bottom_on_tiny_runs(tmp_path):
    common = [*TINY_SYNTHETIC, *FAST_TRAINER, "test=false"]
    hidiff = [
        "model.net.transformer.dim=8",
        "model.net.transformer.num_blocks=[1,1,1,1]",
        "model.net.transformer.num_refinement_blocks=1",
        "model.net.transformer.heads=[1,1,1,1]",
        "model.net.transformer.embed_dim=8",
    ]
    runs = {
        "restormer": ["train", *TINY_RESTORMER, *common],
        "s1": ["train", "model=hidiff_s1", *hidiff, "model.net.latent_encoder.block_num=1", *common],
        "ldm": ["train", "model=ldm_decoder_finetune", "model/ldm_net@model.net=tiny", *common],
    }
    for name, args in runs.items():
        result = run_cli(*args, f"hydra.run.dir={tmp_path}/{name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    stage_two = run_cli(
        "train",
        "model=hidiff_s2",
        f"model.stage1_ckpt={next((tmp_path / 's1' / 'checkpoints').glob('step*.ckpt'))}",
        *hidiff,
        "model.net.condition_encoder.block_num=1",
        "model.latent_encoder.block_num=1",
        "model.net.denoiser.in_channel=32",
        "model.net.denoiser.out_channel=32",
        "model.net.denoiser.inner_channel=16",
        *common,
        f"hydra.run.dir={tmp_path}/s2",
        cwd=tmp_path,
    )
    assert stage_two.returncode == 0, stage_two.stderr[-3000:]

    inspected = execute(REPO_ROOT / "notebooks" / "inspect_results.ipynb", {"DEBLUR_RUN_DIR": str(tmp_path / "restormer")})
    assert "| restored |" in text_outputs(inspected)
    prior = execute(
        REPO_ROOT / "notebooks" / "diffusion_prior.ipynb",
        {
            "HIDIFF_CKPT": str(next((tmp_path / "s2" / "checkpoints").glob("step*.ckpt"))),
            "LDM_CKPT": str(next((tmp_path / "ldm" / "checkpoints").glob("step*.ckpt"))),
        },
    )
    assert "skipped" not in text_outputs(prior)
    images = [o for c in prior.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4


@pytest.mark.parametrize("name", list(stages()))
def test_compile_network_compiles_the_modules_that_the_training_step_calls(name, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, *args, **kwargs: compiled.append(module))
    stage = stages(compile_network=True)[name]
    compiled = [module for module in compiled if any(module is own for own in stage.modules())]
    assert compiled, "nothing was compiled"
    called = set()
    hooks = [module.register_forward_hook(lambda module, inputs, output: called.add(id(module))) for module in compiled]
    sum(stage.training_losses(tiny_batch()).values()).backward()
    for hook in hooks:
        hook.remove()
    # Every compiled module runs in the step, and they hold the trained weights (all but the VQ
    # model's 1x1 quant convs and codebook, which are not worth a compiled graph).
    assert all(id(module) in called for module in compiled), [type(m).__name__ for m in compiled if id(m) not in called]
    covered = {id(p) for module in compiled for p in module.parameters()}
    trained = stage.trainable_parameters()
    share = sum(p.numel() for p in trained if id(p) in covered) / sum(p.numel() for p in trained)
    assert share > 0.95, share


def test_fsdp_with_an_ema_copy_is_a_config_error_before_training():
    from lightning.pytorch.strategies import FSDPStrategy

    from deblur_diffusion.errors import ConfigError

    stage = stages(ema_decay=0.9)["restormer"]
    stage._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ConfigError, match="model.ema_decay=null or use trainer=ddp"):
        stage.setup("fit")


@pytest.mark.slow
def test_an_optuna_trial_on_two_ranks_is_one_trial(tmp_path):
    result = run_cli(
        "train",
        "-m",
        "hparams_search=regression",
        *TINY_RESTORMER,
        *[o for o in TINY_SYNTHETIC if "patch_schedule" not in o],
        *FAST_TRAINER,
        "trainer=ddp_sim",
        "test=false",
        "hydra.sweeper.n_trials=2",
        "sweep.patch_size=32",
        "sweep.batch_size=2",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]
    assert len(list((tmp_path / "sweep").rglob("optimization_results.yaml"))) == 1  # one study, not one per rank
    output = result.stdout + result.stderr
    assert output.count("MEMBER: 2/2") == 2  # each trial started its second rank once
    assert output.count("Best value") == 1  # and no rank ran a study of its own
    for trial in ("0", "1"):
        # The training plan of the trial: global batch 2 over 2 ranks, one sample each, no accumulation.
        log = (tmp_path / "sweep" / trial / "train.log").read_text()
        assert "Training plan: 2 devices, 1 micro-batch per step" in log
        assert re.search(r"│\s+0-[\d,]* │\s+32 │\s+2 │\s+1 │\s+1 │", log)


def test_fsdp_clips_the_global_norm_through_fsdp_itself(tmp_path):
    # Lightning's FSDP precision plugin refuses norm clipping; the stage hands it to FSDP's own
    # clip_grad_norm_ (which reduces the norm over the shards). No GPU here: the composed
    # trainer=fsdp strategy is built as configured, and the wrapped model is a stand-in.
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy
    from networks import TINY_UNET
    from torch.distributed.fsdp import FullyShardedDataParallel

    cfg = compose_config("train", tmp_path, "trainer=fsdp", "model.ema_decay=null")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"] is True

    class ShardedStandIn(FullyShardedDataParallel):
        def __init__(self):  # no process group: only the call is recorded
            torch.nn.Module.__init__(self)
            self.clipped = []

        def clip_grad_norm_(self, max_norm, norm_type=2.0):
            self.clipped.append(max_norm)

    stage = instantiate(cfg.model, net={"_target_": "deblur_diffusion.models.Restormer", **TINY_UNET}, _convert_="all")
    sharded = ShardedStandIn()
    stage._trainer = SimpleNamespace(model=sharded, strategy=strategy)
    stage.configure_gradient_clipping(optimizer=None)
    assert sharded.clipped == [cfg.model.grad_clip_norm] and cfg.model.grad_clip_norm > 0


@pytest.mark.slow
def test_a_really_compiled_network_trains_like_the_eager_one():
    # One real torch.compile (inductor, on the CPU) of a tiny Restormer: the compiled training step's
    # loss and gradients match the eager network's, and the checkpoint keeps its parameter names.
    torch.manual_seed(0)
    eager = stages()["restormer"]
    compiled = stages(compile_network=True)["restormer"]
    compiled.net.load_state_dict(eager.net.state_dict())
    batch = tiny_batch()
    losses = {}
    for name, stage in (("eager", eager), ("compiled", compiled)):
        loss = sum(stage.training_losses(batch).values())
        loss.backward()
        losses[name] = loss.item()
    assert compiled.net._compiled_call_impl is not None
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-5)
    for (key, eager_parameter), (compiled_key, compiled_parameter) in zip(
        eager.net.named_parameters(), compiled.net.named_parameters(), strict=True
    ):
        assert key == compiled_key
        torch.testing.assert_close(compiled_parameter.grad, eager_parameter.grad, rtol=1e-3, atol=1e-5)
    assert set(compiled.state_dict()) == set(eager.state_dict())
