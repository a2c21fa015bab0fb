import math

import pytest
import torch
from torch.utils.data import SequentialSampler

from deblur_diffusion.data.schedule import ProgressiveBatchSampler, ProgressiveSchedule
from deblur_diffusion.stages.schedules import cosine_annealing_restarts

# The official Restormer option files: iters, gt_sizes, mini_batch_sizes.
OFFICIAL_ITERS = [92000, 64000, 48000, 36000, 36000, 24000]
OFFICIAL_PATCHES = [128, 160, 192, 256, 320, 384]
OFFICIAL_BATCHES = [8, 5, 4, 2, 1, 1]


def test_official_schedule_phases():
    schedule = ProgressiveSchedule.from_official(OFFICIAL_ITERS, OFFICIAL_PATCHES, OFFICIAL_BATCHES)
    assert schedule.at(0).patch_size == 128 and schedule.at(0).batch_size == 8
    assert schedule.at(91999).patch_size == 128
    assert schedule.at(92000).patch_size == 160 and schedule.at(92000).batch_size == 5
    assert schedule.at(156000).patch_size == 192
    assert schedule.at(299999).patch_size == 384 and schedule.at(10**7).batch_size == 1
    assert schedule.max_patch_size == 384


@pytest.mark.parametrize(
    "phases", [[], [[1, 64, 2]], [[0, 64, 2], [0, 96, 1]], [[0, 64]], [[0, 0, 2]], [[0, 64, 2], [5, 32, 0]]]
)
def test_invalid_schedules_are_rejected(phases):
    with pytest.raises(ValueError):
        ProgressiveSchedule(phases)


def test_batch_sampler_follows_the_schedule_batch_by_batch():
    schedule = ProgressiveSchedule([[0, 32, 4], [2, 48, 2], [4, 64, 1]])
    sampler = ProgressiveBatchSampler(SequentialSampler(range(13)), schedule, seed=3)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2, 2, 1]
    assert [b[0].patch_size for b in batches] == [32, 32, 48, 48, 64]
    assert [key.index for b in batches for key in b] == list(range(13))
    assert all(len({key.patch_size for key in b}) == 1 for b in batches)
    # The next epoch continues from iteration 5 (last phase), as after a resume.
    assert len(sampler) == 13 and [len(b) for b in sampler] == [1] * 13


def test_batch_sampler_length_matches_iteration():
    schedule = ProgressiveSchedule([[0, 32, 4], [2, 48, 3]])
    sampler = ProgressiveBatchSampler(SequentialSampler(range(14)), schedule)
    assert len(sampler) == len(list(ProgressiveBatchSampler(SequentialSampler(range(14)), schedule)))


def test_sample_seeds_are_deterministic_and_distinct():
    schedule = ProgressiveSchedule([[0, 32, 4]])
    first = list(ProgressiveBatchSampler(SequentialSampler(range(8)), schedule, seed=7))
    again = list(ProgressiveBatchSampler(SequentialSampler(range(8)), schedule, seed=7))
    other = list(ProgressiveBatchSampler(SequentialSampler(range(8)), schedule, seed=8))
    assert first == again
    assert len({key.seed for b in first for key in b}) == 8
    assert first != other


def test_resumed_sampler_starts_in_the_right_phase():
    schedule = ProgressiveSchedule([[0, 32, 4], [10, 64, 2]])
    sampler = ProgressiveBatchSampler(SequentialSampler(range(8)), schedule, start_iteration=10)
    assert [len(b) for b in sampler] == [2, 2, 2, 2]


def official_cosine_restart_lr(step, base, periods, eta_mins):
    """BasicSR's CosineAnnealingRestartCyclicLR, written out from its documented formula."""
    start = 0
    for period, eta_min in zip(periods, eta_mins):
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
