"""The progressive patch-size / batch-size schedule of the official recipes.

Restormer and HI-Diff train on small patches with large batches first and move to larger patches
with smaller batches: a list of phases ``(start_iteration, patch_size, batch_size)``. The batch
sampler below applies it batch by batch, so a phase change needs no new data loader.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import BatchSampler, Sampler

from deblur_diffusion.data.patches import PatchKey


@dataclass(frozen=True)
class Phase:
    start_iteration: int
    patch_size: int
    batch_size: int


class ProgressiveSchedule:
    """Phases given as ``[[start_iteration, patch_size, batch_size], ...]`` starting at iteration 0."""

    def __init__(self, phases: Sequence[Sequence[int]]):
        if not phases:
            raise ValueError("the patch schedule needs at least one phase [start_iteration, patch_size, batch_size]")
        parsed = []
        for phase in phases:
            if len(phase) != 3:
                raise ValueError(f"each phase is [start_iteration, patch_size, batch_size], got {list(phase)}")
            parsed.append(Phase(*(int(v) for v in phase)))
        starts = [p.start_iteration for p in parsed]
        if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"phase starts must begin at 0 and increase strictly, got {starts}")
        if any(p.patch_size < 1 or p.batch_size < 1 for p in parsed):
            raise ValueError(f"patch and batch sizes must be positive, got {[list(p) for p in phases]}")
        self.phases = tuple(parsed)
        self._starts = starts

    @classmethod
    def from_official(
        cls, iters: Sequence[int], gt_sizes: Sequence[int], mini_batch_sizes: Sequence[int]
    ) -> ProgressiveSchedule:
        """From the official option-file fields: iterations per phase, patch sizes, batch sizes."""
        if not len(iters) == len(gt_sizes) == len(mini_batch_sizes):
            raise ValueError("iters, gt_sizes and mini_batch_sizes must have the same length")
        starts = np.concatenate([[0], np.cumsum(iters)[:-1]]).tolist()
        return cls(list(zip(starts, gt_sizes, mini_batch_sizes, strict=True)))

    def at(self, iteration: int) -> Phase:
        return self.phases[bisect.bisect_right(self._starts, iteration) - 1]

    @property
    def max_patch_size(self) -> int:
        return max(p.patch_size for p in self.phases)


class ProgressiveBatchSampler(BatchSampler):
    """Groups the indices of ``sampler`` into batches whose size follows the schedule, and tags
    each index with the phase's patch size and a seed for its crop and augmentation.

    ``start_iteration`` is the number of batches already trained (set on resume). Incomplete last
    batches are dropped. Lightning re-creates this sampler around a ``DistributedSampler`` under
    DDP, so each rank draws its own shard.
    """

    def __init__(self, sampler: Sampler[int], schedule: ProgressiveSchedule, seed: int = 0, start_iteration: int = 0):
        super().__init__(sampler, batch_size=schedule.at(start_iteration).batch_size, drop_last=True)
        self.schedule = schedule
        self.seed = seed
        self.iteration = start_iteration

    def _sample_seed(self, iteration: int, position: int) -> int:
        return int(np.random.SeedSequence([self.seed, iteration, position]).generate_state(1)[0])

    def __iter__(self) -> Iterator[list[PatchKey]]:
        phase = self.schedule.at(self.iteration)
        batch: list[PatchKey] = []
        for index in self.sampler:
            batch.append(PatchKey(int(index), phase.patch_size, self._sample_seed(self.iteration, len(batch))))
            if len(batch) == phase.batch_size:
                yield batch
                self.iteration += 1
                phase = self.schedule.at(self.iteration)
                batch = []

    def __len__(self) -> int:
        remaining = len(self.sampler)
        iteration = self.iteration
        batches = 0
        while remaining >= (size := self.schedule.at(iteration).batch_size):
            remaining -= size
            iteration += 1
            batches += 1
        return batches
