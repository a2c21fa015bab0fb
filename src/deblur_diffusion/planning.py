"""The training plan of a composed config: how many devices the trainer will run, and how the
preset's global batches go over them (:func:`deblur_diffusion.data.schedule.plan_training`).

``train`` works it out and checks it before reading any data, sets the accumulation it found, and
prints it; ``python -m deblur_diffusion.summary experiment=X trainer=ddp trainer.devices=N`` prints
it for any number of devices without running anything.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.table import Table

from deblur_diffusion.data.schedule import ProgressiveSchedule, TrainingPlan, plan_training
from deblur_diffusion.errors import ConfigError


def planned_world_size(trainer: DictConfig) -> int:
    """The processes the trainer config asks for: devices x nodes, as Lightning counts them
    (``-1``/``auto``: every GPU of this machine, or one CPU process)."""
    devices = trainer.get("devices", "auto")
    nodes = int(trainer.get("num_nodes", 1) or 1)
    accelerator = str(trainer.get("accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if isinstance(devices, ListConfig | list | tuple):
        count = len(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    elif str(devices) in ("-1", "auto"):
        if on_gpu:
            count = torch.cuda.device_count()
            if count == 0:
                raise ConfigError(
                    f"trainer.devices={devices} means every GPU of this machine, and it has none: "
                    "give trainer.devices=N (python -m deblur_diffusion.summary plans any N without GPUs)"
                )
        else:
            count = os.cpu_count() or 1 if str(devices) == "-1" else 1
    else:
        count = int(devices)
    if count < 1 or nodes < 1:
        raise ConfigError(f"trainer.devices={devices} x trainer.num_nodes={nodes} is no device")
    return count * nodes


def training_plan(cfg: DictConfig) -> TrainingPlan:
    """The plan of a composed training config (``data.patch_schedule``,
    ``trainer.accumulate_grad_batches``, ``trainer.max_steps``), reading no data."""
    schedule = ProgressiveSchedule(OmegaConf.to_container(cfg.data.patch_schedule, resolve=True))
    max_steps = cfg.trainer.get("max_steps")
    return plan_training(
        schedule,
        planned_world_size(cfg.trainer),
        cfg.trainer.get("accumulate_grad_batches", "auto"),
        None if max_steps in (None, -1) else int(max_steps),
    )


def plan_table(plan: TrainingPlan, dataset_size: int | None = None, caption: str = "") -> Table:
    """The plan as a table: per phase its steps, patch, global batch, per-device micro-batch,
    accumulation and samples (and passes over the data, given its size)."""
    table = Table(
        title=f"Training plan: {plan.world_size} device{'s' * (plan.world_size > 1)}, {plan.accumulation} micro-batch"
        f"{'es' * (plan.accumulation > 1)} per step",
        caption=caption or None,
    )
    columns = ["steps", "patch", "global", "per device", "accum.", "samples"] + ["passes"] * (dataset_size is not None)
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for phase in plan.phases:
        span = f"{phase.start_step:,}-{phase.end_step:,}" if phase.end_step is not None else f"{phase.start_step:,}-"
        row = [span, str(phase.patch_size), str(phase.global_batch), str(phase.micro_batch), str(plan.accumulation)]
        row.append(f"{phase.samples:,}" if phase.samples is not None else "")
        if dataset_size is not None:
            row.append(f"{phase.samples / dataset_size:.1f}" if phase.samples is not None and dataset_size else "")
        table.add_row(*row)
    return table
