"""TargetAgeSampler (SPEC §3): bounds, no-aging frequency, unrounded no-aging targets, age lock, validation."""

from __future__ import annotations

import math

import pytest
import torch

from agingnet.data import TargetAgeSampler


def _draw(sampler: TargetAgeSampler, batches: int, batch: int = 64, seed: int = 0, age: float = 30.0):
    gen = torch.Generator().manual_seed(seed)
    ages = torch.full((batch,), age)
    return [sampler.sample(ages, gen) for _ in range(batches)]


def test_fixed_window_inclusive_both_ends_reachable_and_roughly_uniform():
    s = TargetAgeSampler("fixed", fixed_age=40, jitter=2, no_aging_prob=0.0)
    assert s.window == (38, 42)
    draws = _draw(s, 200)
    assert not any(na for _, na in draws)
    t = torch.cat([d for d, _ in draws])
    assert t.dtype == torch.float32 and t.shape == (200 * 64,)
    assert torch.equal(t, t.round())
    assert t.min() == 38 and t.max() == 42
    counts = torch.bincount(t.long() - 38, minlength=5).float() / t.numel()
    assert counts.shape == (5,)
    assert torch.allclose(counts, torch.full((5,), 0.2), atol=0.02), counts  # U{38..42}: 1/5 each


def test_fixed_zero_jitter_is_constant():
    s = TargetAgeSampler("fixed", fixed_age=40, jitter=0, no_aging_prob=0.0)
    t = torch.cat([d for d, _ in _draw(s, 10)])
    assert torch.equal(t, torch.full_like(t, 40.0))


@pytest.mark.parametrize("lo,hi", [(0, 100), (20, 30)])
def test_uniform_bounds_reached(lo: int, hi: int):
    s = TargetAgeSampler("uniform", min_age=lo, max_age=hi, no_aging_prob=0.0)
    assert s.window is None and s.bounds == (lo, hi)
    t = torch.cat([d for d, _ in _draw(s, 400)])  # 25 600 draws: P(missing an end) < 1e-100
    assert t.min() == lo and t.max() == hi
    assert torch.equal(t, t.round())
    assert len(torch.unique(t)) == hi - lo + 1


def test_no_aging_frequency_about_one_third_and_targets_equal_inputs():
    s = TargetAgeSampler("fixed", fixed_age=40, jitter=2)
    n = 3000
    draws = _draw(s, n, batch=4, age=61.4)
    frac = sum(na for _, na in draws) / n
    sd = math.sqrt((1 / 3) * (2 / 3) / n)  # binomial standard error ≈ 0.0086
    assert abs(frac - 1 / 3) < 4 * sd, frac
    for t, na in draws:
        if na:  # exempt from the lock: equals the (unrounded) input age
            assert torch.equal(t, torch.full((4,), 61.4))
        else:
            assert bool(((t >= 38) & (t <= 42)).all())


def test_no_aging_prob_is_per_batch():
    s = TargetAgeSampler("uniform", no_aging_prob=0.5)
    ages = torch.arange(256, dtype=torch.float32) % 90
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        t, na = s.sample(ages, gen)
        assert torch.equal(t, ages) == na  # the whole batch or none of it


def test_no_aging_targets_are_the_float_input_ages():
    """SAM and the fork use the DEX age unrounded as the no-aging target (and validation does too)."""
    s = TargetAgeSampler("uniform", no_aging_prob=1.0)
    ages = torch.tensor([39.6, 12.2, 40.5, 41.5, 0.4])
    t, na = s.sample(ages)
    assert na
    assert t.tolist() == ages.tolist()
    ages[0] = 0.0  # the targets are a copy, not a view of the caller's tensor
    assert t[0].item() == pytest.approx(39.6)


def test_no_aging_needs_finite_ages():
    s = TargetAgeSampler("uniform", no_aging_prob=1.0)
    with pytest.raises(ValueError, match="finite input ages"):
        s.sample(torch.tensor([30.0, float("nan")]))


def test_seeded_runs_are_reproducible_and_keep_device():
    s = TargetAgeSampler("uniform")
    a = [t for t, _ in _draw(s, 20, seed=7)]
    b = [t for t, _ in _draw(s, 20, seed=7)]
    c = [t for t, _ in _draw(s, 20, seed=8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    t, _ = s.sample(torch.tensor([20.0, 30.0], dtype=torch.float64))
    assert t.dtype == torch.float32 and t.device.type == "cpu" and t.shape == (2,)


def test_age_lock_raises_naming_the_value():
    s = TargetAgeSampler("fixed", fixed_age=40, jitter=2)
    s.check_lock(torch.tensor([38.0, 42.0, 40.0]))  # inside: fine
    with pytest.raises(AssertionError, match=r"target 43 outside window \[38, 42\]"):
        s.check_lock(torch.tensor([40.0, 43.0]))
    with pytest.raises(AssertionError, match="target 37"):
        s.check_lock(torch.tensor([37.0]))
    with pytest.raises(AssertionError, match="40.5"):
        s.check_lock(torch.tensor([40.5]))
    TargetAgeSampler("uniform").check_lock(torch.tensor([3.0, 99.0]))  # no window: no lock


def test_age_lock_guards_sample(monkeypatch):
    s = TargetAgeSampler("fixed", fixed_age=40, jitter=2, no_aging_prob=0.0)
    monkeypatch.setattr(TargetAgeSampler, "bounds", property(lambda self: (50, 50)))  # a broken draw range
    with pytest.raises(AssertionError, match="target 50"):
        s.sample(torch.tensor([30.0, 31.0]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="fixed", fixed_age=40, jitter=-1), "jitter must be >= 0"),
        (dict(mode="fixed"), "needs fixed_age"),
        (dict(mode="fixed", fixed_age=99, jitter=2), r"window \[97, 101\]"),
        (dict(mode="fixed", fixed_age=1, jitter=2), r"window \[-1, 3\]"),
        (dict(mode="linear"), "mode must be"),
        (dict(no_aging_prob=1.5), "no_aging_prob"),
        (dict(min_age=50, max_age=40), "min_age=50 max_age=40"),
        (dict(max_age=120), "max_age=120"),
        (dict(mode="fixed", fixed_age=40, jitter=1.5), "jitter must be an integer"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        TargetAgeSampler(**kwargs)


def test_input_shape_asserted():
    with pytest.raises(ValueError, match=r"\[B\]"):
        TargetAgeSampler().sample(torch.zeros(2, 1))
