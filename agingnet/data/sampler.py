"""Target-age sampling (SPEC §3) and the Phase-3 age lock.

Per batch, with probability ``p = no_aging_prob`` (1/3 by default) the batch is a "no aging" batch and every
target equals its input age as a float, ``t_b = a_b`` (SAM and the fork feed the DEX age unrounded to the age plane
and the aging loss; validation does the same). Otherwise every sample draws its own integer target independently:

- ``mode="uniform"``: ``t_b ~ U{min_age, …, max_age}`` (SAM's [0, 100]);
- ``mode="fixed"``:   ``t_b ~ U{F − J, …, F + J}`` (both ends inclusive), the Phase-3 window, e.g. 38…42.

Aging targets are float tensors holding integers (the age plane is ``int(t)/100``). In fixed mode every emitted
aging target is checked against the window (the age lock); no-aging targets equal the input age and are
exempt.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["TargetAgeSampler"]

Mode = Literal["uniform", "fixed"]
AGE_MIN, AGE_MAX = 0, 100


def _as_int(name: str, value: float | int) -> int:
    if isinstance(value, bool) or float(value) != int(value):
        raise ValueError(f"TargetAgeSampler: {name} must be an integer, got {value!r}")
    return int(value)


class TargetAgeSampler:
    """Draws target ages in years for a batch of input ages (SPEC §3, flags ``--target_age_fixed/_jitter``).

    Args:
        mode: ``"uniform"`` (integers in ``[min_age, max_age]``) or ``"fixed"`` (integers in ``[F−J, F+J]``).
        fixed_age: F, required in fixed mode.
        jitter: J ≥ 0 (fixed mode).
        min_age, max_age: bounds of uniform mode, inside [0, 100].
        no_aging_prob: probability per batch that targets equal the input ages.
    """

    def __init__(
        self,
        mode: Mode = "uniform",
        fixed_age: int | None = None,
        jitter: int = 0,
        min_age: int = AGE_MIN,
        max_age: int = AGE_MAX,
        no_aging_prob: float = 1 / 3,
    ):
        if mode not in ("uniform", "fixed"):
            raise ValueError(f"TargetAgeSampler: mode must be 'uniform' or 'fixed', got {mode!r}")
        jitter, min_age, max_age = (
            _as_int("jitter", jitter),
            _as_int("min_age", min_age),
            _as_int("max_age", max_age),
        )
        if jitter < 0:
            raise ValueError(f"TargetAgeSampler: jitter must be >= 0, got {jitter}")
        if not 0.0 <= float(no_aging_prob) <= 1.0:
            raise ValueError(f"TargetAgeSampler: no_aging_prob must be in [0, 1], got {no_aging_prob}")
        if not AGE_MIN <= min_age <= max_age <= AGE_MAX:
            raise ValueError(
                f"TargetAgeSampler: need {AGE_MIN} <= min_age <= max_age <= {AGE_MAX}, "
                f"got min_age={min_age} max_age={max_age}"
            )
        if mode == "fixed":
            if fixed_age is None:
                raise ValueError("TargetAgeSampler: mode='fixed' needs fixed_age (--target_age_fixed)")
            fixed_age = _as_int("fixed_age", fixed_age)
            if fixed_age - jitter < AGE_MIN or fixed_age + jitter > AGE_MAX:
                raise ValueError(
                    f"TargetAgeSampler: window [{fixed_age - jitter}, {fixed_age + jitter}] "
                    f"(fixed_age={fixed_age}, jitter={jitter}) is outside [{AGE_MIN}, {AGE_MAX}]"
                )
        self.mode: Mode = mode
        self.fixed_age = fixed_age
        self.jitter = jitter
        self.min_age, self.max_age = min_age, max_age
        self.no_aging_prob = float(no_aging_prob)

    @property
    def window(self) -> tuple[int, int] | None:
        """The age-lock window ``(F − J, F + J)`` in fixed mode, ``None`` in uniform mode."""
        if self.mode != "fixed":
            return None
        if not (self.fixed_age is not None):
            raise RuntimeError('internal check failed: self.fixed_age is not None')
        return self.fixed_age - self.jitter, self.fixed_age + self.jitter

    @property
    def bounds(self) -> tuple[int, int]:
        """Inclusive range of aging targets: the window in fixed mode, ``(min_age, max_age)`` otherwise."""
        return self.window or (self.min_age, self.max_age)

    def check_lock(self, targets: Tensor) -> None:
        """Age lock (fixed mode): raise ``AssertionError`` naming the first target outside the window."""
        window = self.window
        if window is None or targets.numel() == 0:
            return
        bad = (targets < window[0]) | (targets > window[1]) | (targets != targets.round())
        if bool(bad.any()):
            value = float(targets[bad][0])
            raise AssertionError(
                f"age lock violated: target {value:g} outside window [{window[0]}, {window[1]}]"
            )

    def sample(
        self, input_ages_years: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, bool]:
        """Draw targets for one batch.

        Args:
            input_ages_years: ``[B]`` input ages in years (finite when the batch is a no-aging batch).
            generator: optional RNG (its device is where the draws are made); the global RNG otherwise.

        Returns:
            ``(targets, no_aging)``: ``targets`` ``[B]`` float32 on the input's device holding integers;
            ``no_aging`` True when ``targets = input_ages_years`` (unrounded).
        """
        if not (input_ages_years.ndim == 1):
            raise ValueError(f"input ages must be [B], got shape {tuple(input_ages_years.shape)}")
        ages = input_ages_years.float()
        device = generator.device if generator is not None else ages.device
        no_aging = bool(torch.rand((), generator=generator, device=device) < self.no_aging_prob)
        if no_aging:
            if not bool(torch.isfinite(ages).all()):
                raise ValueError(
                    "TargetAgeSampler: no-aging batch needs finite input ages, got "
                    f"{ages.tolist()} (predict missing ages with DEX first)"
                )
            return ages.clone(), True
        lo, hi = self.bounds
        targets = torch.randint(lo, hi + 1, (ages.shape[0],), generator=generator, device=device)
        targets = targets.to(device=ages.device, dtype=torch.float32)
        self.check_lock(targets)
        return targets, False

    __call__ = sample

    def __repr__(self) -> str:
        rng = f"window={self.window}" if self.mode == "fixed" else f"range=[{self.min_age}, {self.max_age}]"
        return f"TargetAgeSampler(mode={self.mode}, {rng}, no_aging_prob={self.no_aging_prob:.3f})"
