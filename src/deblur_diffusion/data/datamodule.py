"""The LightningDataModule shared by every model and dataset."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from deblur_diffusion.data.crops import CropRule
from deblur_diffusion.data.patches import TrainPatches, WholeImages
from deblur_diffusion.data.prepared import PreparedCrops
from deblur_diffusion.data.priors import WithPrior
from deblur_diffusion.data.schedule import ProgressiveSchedule, StepBatchSampler
from deblur_diffusion.data.sources import PairSource, PairSubset
from deblur_diffusion.data.store import source_settings
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.protocols import get_protocol


def held_out_split(train: PairSource | None, fraction: float, seed: int) -> tuple[PairSubset, PairSubset]:
    """(training pairs left, held-out validation pairs): ``round(fraction * n)`` pairs (at least one)
    drawn with ``seed``, each side in the source's order."""
    if train is None:
        raise ConfigError("data.val_fraction holds pairs of data.train out, but data.train is null")
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {fraction}")
    count = len(train)
    held = max(1, round(fraction * count))
    if held >= count:
        raise ConfigError(f"data.val_fraction={fraction} of {count} training pairs leaves none to train on")
    chosen = set(np.random.default_rng(seed).permutation(count)[:held].tolist())
    return (
        PairSubset(train, [i for i in range(count) if i not in chosen], f"training pairs left by val_fraction={fraction}"),
        PairSubset(train, sorted(chosen), f"validation pairs held out by val_fraction={fraction}"),
    )


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: each evaluation image on exactly one rank, none
    repeated (``DistributedSampler`` pads with repeats, which would bias the metrics)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def single_threaded_worker(worker_id: int) -> None:
    """Each data worker is one process on one core: OpenCV's and torch's own thread pools would
    only compete with the other workers. (OpenCV's 0 means "run sequentially"; setting 1 in a
    forked worker can deadlock on the pool inherited from the parent.)"""
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


class DeblurDataModule(L.LightningDataModule):
    """Training patches with the progressive schedule; whole images for validation and test.

    Training batches are a pure function of the seed, the optimisation step, the micro-batch, the
    rank and the slot (:class:`~deblur_diffusion.data.schedule.StepBatchSampler`): under DDP every
    rank trains on distinct samples, and a resumed run sees the batches an uninterrupted one would.
    The torch random state is re-seeded from each training batch, so noise drawn in a training
    step (diffusion noise and timesteps) differs between ranks and is reproduced on resume.
    Every validation and test image is evaluated once, on one rank (the trainer configs set
    ``use_distributed_sampler: false``).

    Args:
        train: the training pairs (None when no training runs).
        val: the validation pairs (None when no validation runs).
        test: the test pairs (None when no test runs).
        in_channels: input channels the model expects (3, or 6 for dual-pixel); checked against
            the sources so that a model/data mismatch fails before training.
        dual_pixel: whether the input holds two dual-pixel views (read by model configs).
        patch_schedule: ``[[start_step, patch_size, global_batch_size(, micro_batch_cap)], ...]``;
            the batch is the global one (all ranks and accumulated micro-batches), as the papers
            state it; the optional cap is the most samples one device takes per micro-batch (the
            official per-GPU batch), within which ``trainer.accumulate_grad_batches=auto`` splits it
            (:func:`~deblur_diffusion.data.schedule.plan_training`).
        flips: random horizontal and vertical flips of training patches.
        rotations: random 90-degree rotations of training patches.
        num_workers: data-loading processes (0 loads in the main process).
        seed: seeds the sampling order, crops and augmentations (the run's seed).
        split_seed: seeds which pairs ``val_fraction`` holds out: the same validation pairs
            whatever the run's seed, so that ``evaluate split=val`` scores what training validated on.
        prior_dir: a folder of precomputed diffusion priors (``<prior_dir>/<split>/<pair name>.png``,
            written by ``generate_prior``), appended to the input channels.
        protocol: the evaluation protocol of the dataset's paper tables
            (:mod:`deblur_diffusion.protocols`), used by ``evaluate``.
        repeat_small_dataset: train on a dataset smaller than one step's samples by repeating
            pairs within a batch (otherwise an error).
        crops: the official training-crop rule of the dataset (:class:`~deblur_diffusion.data.crops.CropRule`:
            ``size``, ``stride``, ``keep_sharpest``), what ``python -m deblur_diffusion.data.prepare`` writes.
        prepared_dir: train from the crops prepared into this store instead of the whole images;
            the store must have been made from the configured training set with ``crops`` (checked).
            With ``train: null`` the store is used unchecked (a machine without the original files).
        val_fraction: hold this fraction of the training pairs out as the validation split, in place
            of ``val`` (None: off). For GoPro, HIDE and RealBlur, whose official "val" is the test
            set, it lets a run select checkpoints without the test set. The pairs are drawn with
            ``split_seed`` (the same ones every run), one by one: frames of one scene may fall on both sides.
            Priors of held-out pairs come from ``prior_dir/train``; a store must be prepared with
            the same ``val_fraction`` (it holds the training pairs left).
    """

    def __init__(
        self,
        train: PairSource | None = None,
        val: PairSource | None = None,
        test: PairSource | None = None,
        in_channels: int = 3,
        dual_pixel: bool = False,
        patch_schedule: Sequence[Sequence[int]] = ((0, 128, 8),),
        flips: bool = True,
        rotations: bool = True,
        num_workers: int = 4,
        pin_memory: bool = True,
        seed: int = 0,
        prior_dir: str | None = None,
        protocol: str = "standard",
        repeat_small_dataset: bool = False,
        crops: dict | None = None,
        prepared_dir: str | None = None,
        val_fraction: float | None = None,
        split_seed: int = 0,
    ):
        super().__init__()
        self.protocol = get_protocol(protocol).name
        self.crop_rule = CropRule(**(crops or {}))
        self.sources = {"train": train, "val": val, "test": test}
        if prior_dir is not None:
            self.sources = {
                split: None if source is None else WithPrior(source, Path(prior_dir) / split) for split, source in self.sources.items()
            }
        if val_fraction is not None:
            self.sources["train"], self.sources["val"] = held_out_split(self.sources["train"], val_fraction, split_seed)
        if prepared_dir is not None:
            train_source = self.sources["train"]
            expected = None if train_source is None else source_settings(train_source, self.crop_rule)
            self.sources["train"] = PreparedCrops(prepared_dir, expected)
            if train_source is None:
                self._require_evaluation_reads_like(self.sources["train"])
        for split, source in self.sources.items():
            if source is not None and source.in_channels != in_channels:
                raise ConfigError(
                    f"data.in_channels={in_channels} but the {split} set provides {source.in_channels} input channels ({source.describe()})"
                )
        self.in_channels = in_channels
        self.dual_pixel = dual_pixel
        self.schedule = ProgressiveSchedule(patch_schedule)
        self.flips = flips
        self.rotations = rotations
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.repeat_small_dataset = repeat_small_dataset

    def _require_evaluation_reads_like(self, store: PreparedCrops) -> None:
        """Without the training set there is nothing to check the store against; at least the
        validation and test sets must read the files as the store's crops were read."""
        for split in ("val", "test"):
            source = self.sources[split]
            if source is not None and source.read_8bit != store.read_8bit:
                raise ConfigError(
                    f"data.prepared_dir={store.store} holds crops read with read_8bit={store.read_8bit}, but data.{split} "
                    f"reads with read_8bit={source.read_8bit}: set data.{split}.read_8bit={store.read_8bit}"
                )

    def pairs(self, split: str) -> PairSource:
        """The checked pair source of a split, priors included: what validation and evaluation read."""
        return self._require(split)

    def _require(self, split: str) -> PairSource:
        source = self.sources[split]
        if source is None:
            raise ConfigError(f"data.{split} is not set: this data config has no {split} split")
        source.verify()
        return source

    def _loader_options(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
            "worker_init_fn": single_threaded_worker if self.num_workers > 0 else None,
        }

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_batch_sampler(self) -> StepBatchSampler:
        dataset_size = len(self._require("train"))
        rank, world_size = self._rank_and_world_size()
        trainer = self.trainer
        accumulation = trainer.accumulate_grad_batches if trainer is not None else 1
        # trainer.overfit_batches=N: every epoch (N batches) starts again from the first batch,
        # so the run sees the same N batches (patches, augmentations) over and over.
        overfitting = trainer is not None and trainer.overfit_batches > 0
        return StepBatchSampler(
            dataset_size,
            self.schedule,
            self.seed,
            rank,
            world_size,
            accumulation,
            first_micro_batch=(lambda: trainer.global_step * accumulation) if trainer is not None and not overfitting else (lambda: 0),
            repeat_small_dataset=self.repeat_small_dataset,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = TrainPatches(self._require("train"), self.flips, self.rotations)
        return DataLoader(dataset, batch_sampler=self.train_batch_sampler(), **self._loader_options())

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is not None and self.trainer.training and "seed" in batch:
            # A pure function of the batch's first sample (its step, micro-batch and rank).
            torch.manual_seed(int(batch["seed"][0]))
        return batch

    def _whole_image_loader(self, split: str) -> DataLoader:
        dataset = WholeImages(self._require(split))
        rank, world_size = self._rank_and_world_size()
        return DataLoader(dataset, batch_size=1, sampler=ShardSampler(len(dataset), rank, world_size), **self._loader_options())

    def evaluation_dataloader(self, split: str) -> DataLoader:
        """Whole images of ``split`` in order, loaded ahead by the workers (``evaluate``); no more
        workers than images or CPU cores."""
        dataset = WholeImages(self._require(split))
        workers = min(self.num_workers, len(dataset), os.cpu_count() or 1)
        options = self._loader_options() | {"num_workers": workers, "persistent_workers": False}
        return DataLoader(dataset, batch_size=1, shuffle=False, **options)

    def val_dataloader(self) -> DataLoader:
        return self._whole_image_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._whole_image_loader("test")

    def has_split(self, split: str) -> bool:
        return self.sources.get(split) is not None

    def training_pairs(self) -> int | None:
        """The number of training pairs (None without a training split)."""
        source = self.sources["train"]
        return None if source is None else len(source)

    def reads_whole_image_files(self) -> bool:
        """Whether training patches are cut from whole image files (decoded for every patch), not
        from a prepared crop store or generated pairs."""
        train = self.sources.get("train")
        return train is not None and len(train) > 0 and bool(train.files(0))

    def describe(self) -> list[tuple[str, str]]:
        return [(split, source.describe()) for split, source in self.sources.items() if source is not None]
