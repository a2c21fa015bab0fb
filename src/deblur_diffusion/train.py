"""Training entry point: ``python -m deblur_diffusion.train [overrides]``.

Composes ``conf/train.yaml``, trains, validates (and tests, where the data has a test split) with
the final weights (``evaluate_checkpoint=best``: the best monitored checkpoint), prints the metrics
of the blurry input against the restored output, and returns the monitored metric so that Hydra
sweepers can optimise it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from rich.console import Console
from rich.table import Table

from deblur_diffusion.checkpoints import CheckpointError, read_checkpoint
from deblur_diffusion.cli import RUN_LOG, config_dir, pass_lightning_messages_to_run_log, report_errors, require_complete, show
from deblur_diffusion.cluster import SameResumePoint, resume_checkpoint, under_slurm
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.evaluate import evaluate_training_run
from deblur_diffusion.planning import plan_table, training_plan
from deblur_diffusion.provenance import provenance


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiates every entry of a config group given as a mapping of name -> config."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def switches_for(trainer_cfg: DictConfig, callbacks: list) -> tuple[dict[str, bool], list]:
    """Lightning's switches against the callbacks: one set false removes the callbacks it governs
    (``trainer.enable_progress_bar=false``, or ``callbacks=none``, which sets all three false); one
    left unset is turned on when such a callback is given (instead of Lightning adding its own)."""
    kinds = {"enable_checkpointing": ModelCheckpoint, "enable_progress_bar": ProgressBar, "enable_model_summary": ModelSummary}
    switches, kept = {}, list(callbacks)
    for switch, kind in kinds.items():
        if trainer_cfg.get(switch) is False:
            kept = [callback for callback in kept if not isinstance(callback, kind)]
        elif any(isinstance(callback, kind) for callback in kept):
            switches[switch] = True
    return switches, kept


def metrics_table(title: str, metrics: dict[str, float], prefix: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("blurry input", justify="right")
    table.add_column("restored", justify="right")
    table.add_column("gain", justify="right")
    for name, unit, digits in (("psnr", " dB", 2), ("ssim", "", 4)):
        restored = metrics.get(f"{prefix}/{name}")
        blurry = metrics.get(f"{prefix}/{name}_input")
        if restored is None or blurry is None:
            continue
        table.add_row(name.upper(), f"{blurry:.{digits}f}{unit}", f"{restored:.{digits}f}{unit}", f"{restored - blurry:+.{digits}f}{unit}")
    return table


def plan_caption(datamodule) -> str:
    """Where the training batches come from (with the way to the crop store when they come from
    whole image files)."""
    training_set = dict(datamodule.describe()).get("train", "")
    caption = f"from {training_set}" if training_set else ""
    if datamodule.reads_whole_image_files():
        caption += (
            "\nEvery patch decodes its pair's whole images; `python -m deblur_diffusion.data.prepare` writes "
            "the official crops to a store read 40-95x faster per core (then data.prepared_dir=DIR)."
        )
    return caption


@rank_zero_only
def report(console: Console, output_dir: Path, tables: list[Table], best_checkpoint: str, report_page: Path | None) -> None:
    lines = [f"Run outputs: {output_dir}"]
    if best_checkpoint:
        lines.append(f"  best checkpoint: {best_checkpoint}")
    samples = output_dir / "samples" / "latest.png"
    if samples.is_file():
        lines.append(f"  blurry | restored | sharp: {samples}")
    if report_page is not None:
        lines.append(f"  every validation image, before and after: {report_page} (open it in a browser)")
    show(console, *tables, *lines)


def restarted_job() -> bool:
    """A SLURM job (requeued or not) or a torchrun worker restarted after a failure: its run folder
    is the job's, and a checkpoint there is this run's own progress."""
    return under_slurm() or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def differing_key(saved: dict, current: dict, prefix: str = "") -> str | None:
    """The first key (dotted) whose value differs between two configs, or None."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = differing_key(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} ({a!r} there, {b!r} now)"
    return None


def run_folder_given() -> bool:
    """Whether the run folder was set on the command line (``hydra.run.dir=``) rather than named
    after the job; True outside a Hydra application (a config composed by a program)."""
    try:
        return any(override.startswith("hydra.run.dir=") for override in HydraConfig.get().overrides.hydra)
    except ValueError:
        return True


def checkpoint_to_resume(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint ``fit`` resumes from: ``cfg.ckpt_path`` as given; for ``auto`` (what ``null``
    means in a SLURM job or a restarted torchrun worker) the newest one in this run's folder, which
    in such a job also wins over a given path (the job's own progress since). A folder checkpoint
    of another model or data (two runs of one job sharing the folder) is refused."""
    ckpt_path = cfg.get("ckpt_path")
    if (ckpt_path == "auto" or restarted_job()) and os.environ.get("TORCHELASTIC_RUN_ID") == "none" and not run_folder_given():
        raise ConfigError(
            "torchrun without --rdzv-id gives every start its own run folder, so ckpt_path=auto (and a restarted worker) "
            "would silently start afresh: give torchrun --rdzv-id=<a name for this run>, or hydra.run.dir=<a fixed folder>"
        )
    if ckpt_path not in (None, "auto") and not Path(ckpt_path).is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path} does not exist (the checkpoint to resume from)")
    if ckpt_path != "auto" and not restarted_job():
        return ckpt_path
    found = resume_checkpoint(output_dir)
    if found is None:
        message = f"no checkpoint in {output_dir} yet, " + (
            f"starting from {ckpt_path}" if ckpt_path not in (None, "auto") else "starting a new run"
        )
        chosen = None if ckpt_path == "auto" else ckpt_path
    else:
        saved = read_checkpoint(found, mmap=True).get("deblur_diffusion_config") or {}
        current = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        for section in ("model", "data"):
            difference = differing_key(saved.get(section, {}), current.get(section, {}), f"{section}.")
            if difference:
                raise ConfigError(
                    f"{found} belongs to another run of this job's folder: {difference}. Give each training of one job "
                    "its own hydra.run.dir=..."
                )
        message = f"resuming from {found}" + (
            f" (this job's own progress, not ckpt_path={ckpt_path})" if ckpt_path not in (None, "auto") else ""
        )
        chosen = str(found)
    RUN_LOG.info("ckpt_path=auto: %s", message)
    if rank_zero_only.rank == 0:
        Console().print(f"[yellow]ckpt_path=auto[/]: {message}", highlight=False)
    return chosen


def train(cfg: DictConfig) -> float | None:
    """Runs one training job from a composed config; returns ``cfg.optimized_metric``."""
    # Checked before anything else (the config's intervals depend on the accumulation it sets) and
    # before any data is read: the global batches split over the devices the trainer runs.
    plan = training_plan(cfg)
    with open_dict(cfg.trainer):
        cfg.trainer.accumulate_grad_batches = plan.accumulation
    require_complete(cfg)
    made_by = provenance()
    RUN_LOG.info("deblur-diffusion %s, commit %s", made_by["version"], made_by["commit"])
    if rank_zero_only.rank == 0:
        Console().print(f"deblur-diffusion {made_by['version']} (commit {made_by['commit']})", highlight=False)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    ckpt_path = checkpoint_to_resume(cfg, output_dir)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    if ckpt_path is None:
        for note in model.warm_start():
            Console().print(f"[yellow]warm start[/]: {note}", highlight=False)
            RUN_LOG.info("warm start: %s", note)
    # Plain values only (the choices of the schema as strings): a checkpoint is read with weights_only=True.
    model.run_config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    loggers = instantiate_group(cfg.get("logger"))
    # Lightning refuses a learning-rate monitor without a logger to write to (logger=null, debug presets).
    callbacks = [c for c in instantiate_group(cfg.get("callbacks")) if loggers or not isinstance(c, LearningRateMonitor)]
    switches, callbacks = switches_for(cfg.trainer, callbacks)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **switches)
    for logger in trainer.loggers:
        logger.log_hyperparams(model.run_config)
    if trainer.world_size != plan.world_size:
        raise ConfigError(
            f"the trainer runs {trainer.world_size} processes but trainer.devices x trainer.num_nodes plan {plan.world_size}; "
            "set them to what the launcher starts (srun tasks, torchrun --nproc-per-node x --nnodes)"
        )
    require_after_fit_settings(cfg, model, trainer, datamodule)
    for callback in trainer.callbacks:
        if isinstance(callback, SameResumePoint):
            callback.resume_from = ckpt_path
    if trainer.is_global_zero:
        show(Console(), plan_table(plan, datamodule.training_pairs(), plan_caption(datamodule)))

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    use_best = cfg.evaluate_checkpoint == "best" and bool(best)
    # None: the weights in memory, i.e. the final iteration's.
    evaluation_ckpt = best if use_best else None
    validated = trainer.validate(model, datamodule=datamodule, ckpt_path=evaluation_ckpt, verbose=False, weights_only=True)
    metrics = dict(validated[0]) if validated else {}
    tables = [metrics_table("Validation (best checkpoint)" if use_best else "Validation (final weights)", metrics, "val")]
    if cfg.get("test") and datamodule.has_split("test"):
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=evaluation_ckpt, verbose=False, weights_only=True)
        test_metrics = dict(tested[0]) if tested else {}
        metrics.update(test_metrics)
        tables.append(metrics_table("Test", test_metrics, "test"))
    report_page = None
    if cfg.report and trainer.is_global_zero:
        last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        weights = evaluation_ckpt or last
        if not weights:  # nothing was saved after all (a run stopped before its first checkpoint)
            raise ConfigError("report=true evaluates a saved checkpoint, and this run saved none")
        report_page = evaluate_training_run(cfg, weights, output_dir / "evaluation")
    report(Console(), output_dir, tables, best, report_page)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            # Ends this run, so that the next sweep trial in this process starts its own.
            logger.experiment.finish()

    optimized = cfg.get("optimized_metric")
    if optimized is None:
        return None
    if optimized not in metrics:  # validation switched off (trainer.limit_val_batches=0)
        raise ConfigError(f"optimized_metric={optimized!r} was not logged; logged metrics: {sorted(metrics)}")
    return float(metrics[optimized])


def require_after_fit_settings(cfg: DictConfig, model, trainer: L.Trainer, datamodule) -> None:
    """What train reads once fit has ended, checked before it starts: a mistake there would
    otherwise be found after the whole training run."""
    optimized = cfg.get("optimized_metric")
    tested = bool(cfg.get("test")) and datamodule.has_split("test")
    logged = [name for name in model.evaluation_metrics if tested or not name.startswith("test/")]
    if optimized is not None and optimized not in logged:
        raise ConfigError(f"optimized_metric={optimized!r} is not a metric this model logs: {', '.join(logged)}")
    if cfg.report:
        saver = trainer.checkpoint_callback
        if saver is None:
            raise ConfigError("report=true evaluates a saved checkpoint: keep the checkpoint callback (callbacks=default)")
        if not saver.save_last and not (cfg.evaluate_checkpoint == "best" and saver.save_top_k != 0):
            raise ConfigError(
                f"report=true evaluates the {cfg.evaluate_checkpoint} checkpoint, which this checkpoint callback does not save "
                "(save_last=false): keep callbacks.model_checkpoint.save_last=true"
            )


# What Lightning's subprocess launcher sets in the launching process.
DDP_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def relaunch_ranks_as_this_trial() -> None:
    """In a sweep (Hydra multirun), makes Lightning's DDP launcher start the other ranks on this
    trial only: it re-runs the parent's command line, which would otherwise start a sweep (and an
    Optuna study) of its own in every rank. The ranks get this job's overrides in run mode, in this
    job's folder."""
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hydra_cfg = HydraConfig.get()
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg):
        # Lightning passes hydra.run.dir=<this> to the ranks it starts.
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    pass_lightning_messages_to_run_log()
    relaunch_ranks_as_this_trial()
    launcher_environment = {name: os.environ.get(name) for name in DDP_LAUNCH_VARIABLES}
    try:
        return train(cfg)
    finally:
        # The ranks of this run exit with it: the next sweep trial starts its own ranks and process
        # group (Lightning's launcher leaves its variables set, which would make it start none).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in launcher_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


if __name__ == "__main__":
    main()
