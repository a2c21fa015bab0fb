import math

import pytest
import torch
from conftest import official_schedule

from deblur_diffusion.data.schedule import ProgressiveSchedule, StepBatchSampler
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.stages.schedules import cosine_annealing_restarts

# The official Restormer option files: iters, gt_sizes, mini_batch_sizes.
OFFICIAL_ITERS = [92000, 64000, 48000, 36000, 36000, 24000]
OFFICIAL_PATCHES = [128, 160, 192, 256, 320, 384]
OFFICIAL_BATCHES = [8, 5, 4, 2, 1, 1]


def test_official_schedule_phases():
    schedule = official_schedule(OFFICIAL_ITERS, OFFICIAL_PATCHES, OFFICIAL_BATCHES)
    assert schedule.at(0).patch_size == 128 and schedule.at(0).batch_size == 8
    assert schedule.at(91999).patch_size == 128
    assert schedule.at(92000).patch_size == 160 and schedule.at(92000).batch_size == 5
    assert schedule.at(156000).patch_size == 192
    assert schedule.at(299999).patch_size == 384 and schedule.at(10**7).batch_size == 1
    assert [phase.start_iteration for phase in schedule.phases] == [0, 92000, 156000, 204000, 240000, 276000]


@pytest.mark.parametrize("phases", [[], [[1, 64, 2]], [[0, 64, 2], [0, 96, 1]], [[0, 64]], [[0, 0, 2]], [[0, 64, 2], [5, 32, 0]]])
def test_invalid_schedules_are_rejected(phases):
    with pytest.raises(ValueError):
        ProgressiveSchedule(phases)


def sampler(size=13, phases=((0, 32, 4), (2, 48, 2), (4, 64, 1)), **kwargs):
    return StepBatchSampler(size, ProgressiveSchedule([list(p) for p in phases]), seed=3, **kwargs)


def test_batches_follow_the_schedule_step_by_step_through_a_stream_of_permutations():
    batches = [sampler().batch(step) for step in range(12)]
    assert [len(b) for b in batches] == [4, 4, 2, 2] + [1] * 8
    assert [b[0].patch_size for b in batches] == [32, 32, 48, 48] + [64] * 8
    stream = [key.index for b in batches for key in b]
    # One pass over the 13 pairs is a permutation; the next pass another one.
    assert sorted(stream[:13]) == list(range(13)) and stream[13:] != stream[: len(stream) - 13]
    assert len({key.seed for b in batches for key in b}) == len(stream)


def test_an_iteration_starts_where_it_is_told_and_repeats_exactly():
    start = {"value": 0}
    draw = sampler(first_micro_batch=lambda: start["value"])
    reference = sampler()
    assert list(draw) == [reference.batch(k) for k in range(len(draw))]
    start["value"] = 5
    assert list(draw) == list(draw) == [reference.batch(k) for k in range(5, 5 + len(draw))]


def test_ranks_and_micro_batches_split_each_step_without_overlap():
    phases = ((0, 32, 8), (3, 64, 4))
    parts = {(r, a): sampler(40, phases, rank=r, world_size=2, accumulation=2) for r in (0, 1) for a in (0, 1)}
    for step in range(6):
        keys = [key for (r, a), s in sorted(parts.items(), key=lambda item: (item[0][1], item[0][0])) for key in s.batch(step * 2 + a)]
        assert len(keys) == (8 if step < 3 else 4) and len({k.seed for k in keys}) == len(keys)
        whole = sampler(40, phases).batch(step)  # one rank, no accumulation: the same step's samples
        assert [k.index for k in keys] == [k.index for k in whole] and [k.seed for k in keys] == [k.seed for k in whole]


def test_a_global_batch_that_does_not_split_or_a_too_small_dataset_is_an_error():
    with pytest.raises(ConfigError, match=r"global batch 6 .* not divisible by 4 ranks x 1"):
        sampler(phases=((0, 32, 6),), world_size=4)
    with pytest.raises(ConfigError, match=r"data.train has 3 pairs, fewer than one micro-batch step needs: 4 \(2 per rank x 2 ranks\)"):
        sampler(3, ((0, 32, 4),), world_size=2)
    repeated = sampler(3, ((0, 32, 4),), repeat_small_dataset=True).batch(0)
    assert len(repeated) == 4 and len({k.index for k in repeated}) == 3


def official_cosine_restart_lr(step, base, periods, eta_mins):
    """BasicSR's CosineAnnealingRestartCyclicLR, written out from its documented formula."""
    start = 0
    for period, eta_min in zip(periods, eta_mins, strict=False):
        if step < start + period:
            return eta_min + 0.5 * (base - eta_min) * (1 + math.cos(math.pi * (step - start) / period))
        start += period
    return eta_mins[-1]


def test_cosine_restarts_follow_the_official_recipe():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    scheduler = cosine_annealing_restarts(optimizer, periods=[92000, 208000], eta_mins=[3e-4, 1e-6])
    factor = scheduler.lr_lambdas[0]
    for step in [0, 1, 50000, 91999, 92000, 150000, 299999, 300000, 400000]:
        expected = official_cosine_restart_lr(step, 3e-4, [92000, 208000], [3e-4, 1e-6])
        assert 3e-4 * factor(step) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 3e-4 * factor(92000 + 104000) == pytest.approx((3e-4 + 1e-6) / 2)


def test_scheduler_state_round_trips():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = cosine_annealing_restarts(optimizer, periods=[10], eta_mins=[1e-5])
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    restored_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    restored = cosine_annealing_restarts(restored_optimizer, periods=[99], eta_mins=[0.0])
    restored.load_state_dict(scheduler.state_dict())
    assert restored.last_epoch == 4
    assert restored.lr_lambdas[0].periods == [10]
