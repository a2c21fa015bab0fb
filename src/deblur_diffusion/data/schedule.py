"""The progressive patch-size / batch-size schedule of the official recipes, and the batch sampler
that draws training batches as a pure function of the optimisation step.

Restormer and HI-Diff train on small patches with large batches first and move to larger patches
with smaller batches: a list of phases ``(start_step, patch_size, global_batch_size)``. The batch
size is the **global** one, over all ranks and accumulated micro-batches, as the papers state it;
each rank's micro-batch is ``global / (world_size * accumulation)``.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from torch.utils.data import Sampler

from deblur_diffusion.data.patches import PatchKey
from deblur_diffusion.errors import ConfigError


@dataclass(frozen=True)
class Phase:
    start_iteration: int
    patch_size: int
    batch_size: int
    # The most samples one device takes per micro-batch in this phase (the official per-GPU batch);
    # None: no limit.
    micro_batch_cap: int | None = None


class ProgressiveSchedule:
    """Phases given as ``[[start_iteration, patch_size, batch_size(, micro_batch_cap)], ...]``
    starting at iteration 0; the batch is the global one, the optional cap the most samples one
    device takes per micro-batch (:func:`plan_training`)."""

    def __init__(self, phases: Sequence[Sequence[int]]):
        if not phases:
            raise ValueError("the patch schedule needs at least one phase [start_iteration, patch_size, batch_size]")
        parsed = []
        for phase in phases:
            if len(phase) not in (3, 4):
                raise ValueError(f"each phase is [start_iteration, patch_size, global batch(, per-device cap)], got {list(phase)}")
            parsed.append(Phase(*(int(v) for v in phase)))
        starts = [p.start_iteration for p in parsed]
        if starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)):
            raise ValueError(f"phase starts must begin at 0 and increase strictly, got {starts}")
        if any(p.patch_size < 1 or p.batch_size < 1 or (p.micro_batch_cap is not None and p.micro_batch_cap < 1) for p in parsed):
            raise ValueError(f"patch and batch sizes must be positive, got {[list(p) for p in phases]}")
        self.phases = tuple(parsed)
        self._starts = starts

    def at(self, iteration: int) -> Phase:
        return self.phases[bisect.bisect_right(self._starts, iteration) - 1]

    def per_device_batches(self, world_size: int, accumulation: int) -> list[int]:
        """Each phase's micro-batch per rank: global / (world_size x accumulation), which must divide."""
        for phase in self.phases:
            if phase.batch_size % (world_size * accumulation):
                raise ConfigError(
                    f"the global batch {phase.batch_size} (data.patch_schedule, from step {phase.start_iteration}) is not "
                    f"divisible by {world_size} ranks x {accumulation} accumulated micro-batches "
                    "(trainer.devices x trainer.num_nodes x trainer.accumulate_grad_batches)"
                )
        return [phase.batch_size // (world_size * accumulation) for phase in self.phases]

    def samples_before(self, step: int) -> int:
        """How many samples (globally) the steps before ``step`` consume."""
        total = 0
        for phase, following in zip(self.phases, [*self._starts[1:], None], strict=False):
            end = step if following is None else min(step, following)
            total += max(0, end - phase.start_iteration) * phase.batch_size
        return total


@dataclass(frozen=True)
class PhasePlan:
    """One phase of a training plan: its steps and how its global batch is split."""

    start_step: int
    end_step: int | None
    patch_size: int
    global_batch: int
    micro_batch: int

    @property
    def steps(self) -> int | None:
        return None if self.end_step is None else self.end_step - self.start_step

    @property
    def samples(self) -> int | None:
        return None if self.steps is None else self.steps * self.global_batch


@dataclass(frozen=True)
class TrainingPlan:
    """How a run's global batches go over ``world_size`` devices: ``accumulation`` micro-batches of
    ``micro_batch`` samples per device and optimisation step, phase by phase."""

    world_size: int
    accumulation: int
    phases: tuple[PhasePlan, ...]


def _accumulation_for(schedule: ProgressiveSchedule, world_size: int) -> int | None:
    """The fewest micro-batches per step that split every phase's global batch evenly over
    ``world_size`` devices within the phases' caps; None where there is no such split."""
    smallest = min(phase.batch_size for phase in schedule.phases)
    for accumulation in range(1, smallest // world_size + 1):
        ranks_times = world_size * accumulation
        if all(
            phase.batch_size % ranks_times == 0
            and (phase.micro_batch_cap is None or phase.batch_size // ranks_times <= phase.micro_batch_cap)
            for phase in schedule.phases
        ):
            return accumulation
    return None


def plan_training(
    schedule: ProgressiveSchedule, world_size: int, accumulation: int | str = "auto", max_steps: int | None = None
) -> TrainingPlan:
    """The training plan of ``schedule`` (global batches) on ``world_size`` devices.

    ``accumulation="auto"`` takes the fewest micro-batches per optimisation step that split every
    phase's global batch evenly over the devices with at most the phase's cap of samples per device
    (the official per-GPU sizes in the presets), so that a preset trains the papers' global batches
    on any number of devices that can hold them. A number is used as given. Where no even split
    exists, refuses naming the device counts that have one."""
    if accumulation == "auto":
        chosen = _accumulation_for(schedule, world_size)
        if chosen is None:
            largest = max(phase.batch_size for phase in schedule.phases)
            workable = [count for count in range(1, largest + 1) if _accumulation_for(schedule, count) is not None]
            caps = [phase.micro_batch_cap for phase in schedule.phases]
            limit = "" if all(cap is None for cap in caps) else f" with at most {caps} samples per device (each phase's fourth value)"
            raise ConfigError(
                f"the global batches {[phase.batch_size for phase in schedule.phases]} (data.patch_schedule) cannot be split evenly "
                f"over {world_size} devices{limit}; device counts that can: {', '.join(map(str, workable))}. Use one of them "
                "(trainer.devices x trainer.num_nodes), or change the global batches (which changes the recipe)"
            )
        accumulation = chosen
    accumulation = int(accumulation)
    if accumulation < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches must be auto or a positive number, got {accumulation}")
    micro = schedule.per_device_batches(world_size, accumulation)
    ends = [phase.start_iteration for phase in schedule.phases[1:]] + [max_steps]
    phases = tuple(
        PhasePlan(
            phase.start_iteration,
            None if end is None else (min(end, max_steps) if max_steps else end),
            phase.patch_size,
            phase.batch_size,
            size,
        )
        for phase, end, size in zip(schedule.phases, ends, micro, strict=True)
        if max_steps is None or phase.start_iteration < max_steps
    )
    return TrainingPlan(world_size, accumulation, phases)


@lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(size)


class StepBatchSampler(Sampler[list[PatchKey]]):
    """Training batches as a pure function of (seed, step, micro-batch, rank, slot).

    The samples of the whole run form one stream: a new seeded permutation of the dataset per pass.
    Step ``k`` takes the next ``global batch`` positions of the stream; its micro-batch ``a`` on
    rank ``r`` takes ``micro`` of them, where ``micro = global / (world_size * accumulation)``. Each
    sample's crop and augmentation seed is derived from its position in the stream. So what a rank
    receives at a step does not depend on the number of workers, their prefetching, where Lightning
    ends its epochs, or on resuming: every iteration starts again at ``first_micro_batch()`` (the
    trainer's global step times the accumulation) and may be cut anywhere.

    Args:
        dataset_size: the number of training pairs.
        schedule: phases with global batch sizes, indexed by optimisation step.
        seed: the run's seed.
        rank: this process.
        world_size: the number of processes.
        accumulation: micro-batches per optimisation step (Lightning's ``accumulate_grad_batches``).
        first_micro_batch: where an iteration starts (a callable read when it starts).
        repeat_small_dataset: allow a dataset smaller than one step's samples (pairs then repeat
            within a batch); otherwise that is an error.
    """

    def __init__(
        self,
        dataset_size: int,
        schedule: ProgressiveSchedule,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
        first_micro_batch: Callable[[], int] = lambda: 0,
        repeat_small_dataset: bool = False,
    ):
        schedule.per_device_batches(world_size, accumulation)
        largest = max(p.batch_size for p in schedule.phases) // accumulation
        if dataset_size < largest and not repeat_small_dataset:
            raise ConfigError(
                f"data.train has {dataset_size} pairs, fewer than one micro-batch step needs: {largest} "
                f"({largest // world_size} per rank x {world_size} ranks); use more data, a smaller "
                "data.patch_schedule batch, or data.repeat_small_dataset=true to repeat pairs within batches"
            )
        self.dataset_size = dataset_size
        self.schedule = schedule
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accumulation = accumulation
        self.first_micro_batch = first_micro_batch

    def micro_batch_size(self, step: int) -> int:
        return self.schedule.at(step).batch_size // (self.world_size * self.accumulation)

    def batch(self, micro_batch: int) -> list[PatchKey]:
        """The keys this rank trains on at micro-batch ``micro_batch`` (step = micro_batch // accumulation)."""
        step, within = divmod(micro_batch, self.accumulation)
        phase = self.schedule.at(step)
        size = self.micro_batch_size(step)
        first = self.schedule.samples_before(step) + (within * self.world_size + self.rank) * size
        keys = []
        for position in range(first, first + size):
            epoch, offset = divmod(position, self.dataset_size)
            index = int(_epoch_permutation(self.seed, epoch, self.dataset_size)[offset])
            sample_seed = int(np.random.SeedSequence([self.seed, position]).generate_state(1)[0])
            keys.append(PatchKey(index, phase.patch_size, sample_seed))
        return keys

    def __len__(self) -> int:
        """Micro-batches per (nominal) epoch: about one pass over the data at the first phase's
        batch, a whole number of optimisation steps."""
        steps = max(1, self.dataset_size // self.schedule.phases[0].batch_size)
        return steps * self.accumulation

    def __iter__(self) -> Iterator[list[PatchKey]]:
        start = self.first_micro_batch()
        for micro_batch in range(start, start + len(self)):
            yield self.batch(micro_batch)
