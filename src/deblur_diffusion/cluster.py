"""What a run needs on a cluster: a run folder every rank and every requeue agree on, resuming from
it, preemption that saves at an optimisation step, and ranks that fail together.

* :func:`run_id` names the run folder (``${run_id:}`` in ``conf/train.yaml``): the SLURM job (and
  array task), which a requeued job keeps; torchrun's rendezvous id; otherwise the launch time.
* :func:`resume_checkpoint` finds the furthest checkpoint of a run folder (``ckpt_path=auto``).
* :class:`Preemption` saves a checkpoint when the job is signalled (SLURM's requeue signal or
  SIGTERM), at the end of the optimisation step in progress, so that the resumed run goes on as
  an uninterrupted one would; on the requeue signal it also requeues the job (``scontrol requeue``).
* :class:`RanksFailTogether` stops every rank within a second when one fails (a non-finite loss,
  an error in its data loading), instead of leaving the others blocked in a collective until the
  process group's timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from deblur_diffusion.errors import DeblurError

RESUME_FILES = ("checkpoints/last.ckpt", "hpc_ckpt_*.ckpt")


def slurm_job() -> str | None:
    """The SLURM job this process belongs to (``<array job>_<task>`` for an array), or None."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def under_slurm() -> bool:
    """A SLURM batch job (Lightning's test: an interactive ``srun bash`` is not one)."""
    return SLURMEnvironment.detect()


def run_id() -> str:
    """The name of a run's folder, the same for every rank and every restart of one job."""
    job = slurm_job()
    if job and under_slurm():
        return f"slurm-{job}"
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":
        return f"torchrun-{elastic}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _progress(path: Path) -> tuple[int, int]:
    """(optimisation step, epoch) recorded in a checkpoint, read without loading its tensors; an
    unreadable one counts as no progress (-1)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint.get("global_step", 0)), int(checkpoint.get("epoch", 0))
    except Exception:  # a truncated or foreign file is no resume point
        return -1, -1


def resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The furthest checkpoint of a run folder (``checkpoints/last.ckpt``, Lightning's ``hpc_ckpt_N``),
    or None. Chosen by the step each records, ties by name, not by file times, which the ranks of a
    job on a network file system can see differently: every rank resumes from the same file."""
    found = [path for pattern in RESUME_FILES for path in Path(run_dir).glob(pattern) if path.is_file()]
    ranked = [(_progress(path), str(path), path) for path in found]
    ranked = [entry for entry in ranked if entry[0][0] >= 0]
    return max(ranked)[2] if ranked else None


class ResumeMismatchError(DeblurError):
    """The ranks of a job resumed from different steps."""


class SameResumePoint(L.Callback):
    """Checks, once the process group is up and before any training state is restored, that every
    rank resumes from the same step: ranks choose the checkpoint by its recorded step
    (:func:`resume_checkpoint`), which they agree on unless their file systems show different
    files (a checkpoint not yet visible on another node). Ranks that differ all stop, naming each
    one's step and file, instead of training on from different weights."""

    def __init__(self):
        # What train passes to fit (set by train): sharded strategies (FSDP) load it after
        # on_fit_start, when trainer.ckpt_path is not set yet.
        self.resume_from: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_fit_start: every rank calls it (on_train_start is skipped by a rank resumed at the end).
        if trainer.world_size < 2:
            return
        path = self.resume_from or trainer.ckpt_path
        step = _progress(Path(path))[0] if path else 0
        steps = trainer.strategy.all_gather(torch.tensor([step], device=trainer.strategy.root_device)).flatten().tolist()
        if len(set(steps)) > 1:
            listed = ", ".join(f"rank {rank}: step {found}" for rank, found in enumerate(steps))
            raise ResumeMismatchError(
                f"the ranks resume from different checkpoints ({listed}; rank {trainer.global_rank} read {path}): "
                "they do not see the same files; wait for the file system to settle and start again"
            )


class PreemptedError(DeblurError):
    """The job was signalled; a checkpoint was saved and the run stopped."""


class Preemption(L.Callback):
    """Saves ``dirpath/last.ckpt`` at the end of the optimisation step during which the job was
    signalled, then stops the run (exit status 1).

    Args:
        dirpath: where the checkpoint goes (the checkpoint callback's folder, which
            ``ckpt_path=auto`` reads).
        requeue_signals: SLURM's warning before the time limit (``sbatch --signal=USR1@120``;
            Hydra's submitit launcher asks for USR2); under SLURM, rank 0 then requeues the job,
            which resumes from the checkpoint.

    SIGTERM (``scancel``, a preempting partition, or the time limit itself) saves the same way
    without requeueing. Lightning's own SLURM handler is replaced: it saves at once, which in the
    middle of gradient accumulation loses the micro-batches accumulated so far.
    """

    def __init__(self, dirpath: str | Path, requeue_signals: Sequence[str] = ("SIGUSR1", "SIGUSR2")):
        self.dirpath = Path(dirpath)
        self.requeue_signals = {signal.Signals[name] for name in requeue_signals}
        self.received: set[signal.Signals] = set()
        self.previous_handlers: dict[signal.Signals, object] = {}
        self.last_step = -1

    def _handle(self, signum: int, _frame) -> None:
        # Kept, not replaced: SLURM's warning followed by the time limit's SIGTERM still requeues.
        self.received.add(signal.Signals(signum))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its handlers in fit(), so these replace them for the training loop.
        if threading.current_thread() is threading.main_thread():
            for signum in {*self.requeue_signals, signal.SIGTERM}:
                self.previous_handlers[signum] = signal.signal(signum, self._handle)
        self.last_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers.clear()

    def _requests(self, trainer: L.Trainer) -> tuple[bool, bool]:
        """(stop, requeue), each true when any rank received such a signal."""
        flags = torch.tensor(
            [float(bool(self.received)), float(bool(self.received & self.requeue_signals))], device=trainer.strategy.root_device
        )
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="max")  # elementwise: either rank's request
        return bool(flags[0]), bool(flags[1])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        stepped = trainer.global_step != self.last_step
        self.last_step = trainer.global_step
        if not stepped:
            return  # between the micro-batches of one accumulated step
        stop, requeue_job = self._requests(trainer)
        if not stop:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        requeued = requeue(slurm_job()) if requeue_job and under_slurm() and trainer.is_global_zero else ""
        resume = (
            "the job run again resumes from it (ckpt_path=auto, the default under SLURM)"
            if under_slurm()
            else f"resume with ckpt_path={path}"
        )
        names = "+".join(sorted(signal.Signals(s).name for s in self.received)) or "a signal on another rank"
        raise PreemptedError(
            f"{names} received: stopped after step {trainer.global_step} with its checkpoint saved to {path}{requeued}; {resume}"
        )


def requeue(job: str) -> str:
    """Asks SLURM to requeue ``job``; says how it went."""
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        return f"; scontrol requeue {job} failed: {error}"
    return f"; job {job} requeued" if result.returncode == 0 else f"; scontrol requeue {job} failed: {result.stderr.strip()}"


# Stops that every rank makes together: no peer needs to be told.
EXPECTED_STOPS = (PreemptedError, SIGTERMException, KeyboardInterrupt, SystemExit)
FAILURE_KEY = "deblur_diffusion/failed_rank"


class RanksFailTogether(L.Callback):
    """When one rank fails, the others exit (status 1) within ``poll_seconds``.

    The failing rank writes its error to the process group's key-value store (the one every rank
    connected to at start); a thread in every rank polls that key and, when it appears, prints it
    and ends the process. Without this, the peers of a rank that raised wait in their next
    all-reduce until the process group times out (30 minutes by default).
    """

    def __init__(self, poll_seconds: float = 0.5):
        self.poll_seconds = poll_seconds
        self.store = None
        self.stopped: threading.Event | None = None  # made in setup: an Event does not pickle (ddp_spawn)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size < 2 or not dist.is_initialized():
            return
        self.store = dist.distributed_c10d._get_default_store()
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, args=(self.store, trainer.global_rank, self.stopped), daemon=True).start()

    def _watch(self, store, rank: int, stopped: threading.Event) -> None:
        while not stopped.wait(self.poll_seconds):
            with contextlib.suppress(Exception):  # a store gone with its process group ends nothing here
                if store.check([FAILURE_KEY]):
                    failure = store.get(FAILURE_KEY).decode()
                    if not stopped.is_set() and not failure.startswith(f"rank {rank} "):
                        print(f"error: rank {rank} stops because {failure}", file=sys.stderr, flush=True)
                        os._exit(1)
                    return

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.store is None:
            return
        self.stopped.set()  # this rank ends by its own exception; its watcher must not race it
        if isinstance(exception, EXPECTED_STOPS):
            return  # every rank stops there together (a preemption, an interrupt)
        message = str(exception).splitlines()[0] if str(exception) else type(exception).__name__
        with contextlib.suppress(Exception):  # the store's host (rank 0) may be gone already
            self.store.set(FAILURE_KEY, f"rank {trainer.global_rank} failed at step {trainer.global_step}: {message}")
            # Give the peers' watchers the time to read it before this process (and maybe the
            # store's server, held by rank 0) goes away.
            time.sleep(2 * self.poll_seconds)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.stopped is not None:
            self.stopped.set()
        self.store = None
