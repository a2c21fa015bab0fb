"""Lightning callbacks of the package."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from deblur_diffusion.data.io import to_float, write_atomically, write_image
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
        written = write_image(self.dirpath / f"step{step:07d}.png", to_float(picture))
        write_atomically(self.dirpath / "latest.png", written.read_bytes())  # the same file, not encoded again
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/samples", picture, step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image("val/samples", [picture], step=step, caption=["blurry | restored | sharp"])
        self._rows = []


class StepProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, titled ``Epoch N`` when ``max_epochs=-1`` (the runs here are
    bounded by ``max_steps``; an epoch is one pass over the training pairs) instead of Lightning's
    ``Epoch N/-2``."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is None or self.trainer.max_epochs < 0:
            return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)


class TextProgress(ProgressBar):
    """A plain line every ``every_n_steps`` optimisation steps (default: the trainer's
    ``log_every_n_steps``) and after each validation, for log files: step, speed, time left and
    the progress-bar metrics (the training loss); then the validation metrics."""

    def __init__(self, every_n_steps: int | None = None):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.enabled = True
        self.started = 0.0
        self.first_step = 0
        self.last_printed = -1

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _print(self, trainer: L.Trainer, text: str) -> None:
        if self.enabled and trainer.is_global_zero:
            print(text, flush=True)

    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        shown = {name: value for name, value in self.get_metrics(trainer, pl_module).items() if name != "v_num"}
        return " ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}" for name, value in shown.items())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started, self.first_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.last_printed or step % (self.every_n_steps or trainer.log_every_n_steps):
            return
        self.last_printed = step
        elapsed = time.monotonic() - self.started
        rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0
        total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        left = f", {(trainer.max_steps - step) / rate / 60:.1f} min left" if rate > 0 and trainer.max_steps > 0 else ""
        self._print(trainer, f"step {step}{total}: {rate:.2f} steps/s{left}; {self._metrics(trainer, pl_module)}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        scores = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
        shown = " ".join(f"{name} {value:.4g}" for name, value in sorted(scores.items()))
        when = f"after step {trainer.global_step}" if trainer.state.fn == TrainerFn.FITTING else "(closing)"
        self._print(trainer, f"validation {when}: {shown}")
