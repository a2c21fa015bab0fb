"""Faults injected into training runs started as subprocesses (``PYTHONPATH=tests``): a signal at a
chosen micro-batch, a loss that turns non-finite on one rank."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch
import torch.distributed as dist


class SignalAtBatch(L.Callback):
    """Sends ``signum`` to this process after micro-batch ``batch`` (0-based, counted over the run)."""

    def __init__(self, batch: int, signum: str = "SIGTERM"):
        self.batch, self.signum, self.seen = batch, signal.Signals[signum], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.seen == self.batch:
            os.kill(os.getpid(), self.signum)
        self.seen += 1


class NonFiniteOnRank(torch.nn.L1Loss):
    """L1, but NaN on ``rank`` from its call number ``call`` (0-based) on."""

    def __init__(self, rank: int, call: int):
        super().__init__()
        self.rank, self.call, self.calls = rank, call, 0

    def forward(self, restored, target):
        loss = super().forward(restored, target)
        self.calls += 1
        here = dist.get_rank() if dist.is_initialized() else 0
        return loss * float("nan") if here == self.rank and self.calls > self.call else loss


class ResumedElsewhereOnRank(L.Callback):
    """Makes ``rank`` resume from a checkpoint that records step ``step`` (as a rank that saw
    another file would); placed before the callbacks it fools."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank:
            path = f"{trainer.default_root_dir}/elsewhere_rank{self.rank}.ckpt"
            torch.save({"global_step": self.step, "epoch": 0}, path)
            trainer.ckpt_path = path
