"""Lightning callbacks of the package."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from deblur_diffusion.data.io import write_image
from deblur_diffusion.visualize import comparison_row, stack_rows


class ValidationSamples(L.Callback):
    """Saves ``blurry | restored | sharp`` comparisons of the first validation images.

    After every validation (rank zero only) it writes ``<dirpath>/step<N>.png`` and
    ``<dirpath>/latest.png``, and sends the picture to TensorBoard or W&B when they are used.
    The validation step must return ``{"restored": tensor}``.
    """

    def __init__(self, dirpath: str | Path, num_images: int = 4):
        self.dirpath = Path(dirpath)
        self.num_images = num_images
        self._rows: list[np.ndarray] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or len(self._rows) >= self.num_images:
            return
        for lq, restored, gt, name in zip(batch["lq"], outputs["restored"], batch["gt"], batch["name"], strict=True):
            if len(self._rows) < self.num_images:
                self._rows.append(comparison_row(lq[:3], restored, gt, title=name))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._rows:
            return
        picture = stack_rows(self._rows)
        step = trainer.global_step
        write_image(self.dirpath / f"step{step:07d}.png", picture.astype(np.float32) / 255.0)
        write_image(self.dirpath / "latest.png", picture.astype(np.float32) / 255.0)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/samples", picture, step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image("val/samples", [picture], step=step, caption=["blurry | restored | sharp"])
        self._rows = []
