"""Piecewise-constant weight schedules written as ``"step:value,step:value,..."``.

``value(step)`` is the value of the last entry whose step is ``<= step``; before the first entry the
base weight applies (SPEC §4).
"""

from __future__ import annotations

from bisect import bisect_right


class WeightSchedule:
    """Parse and evaluate a ``"step:value,..."`` schedule.

    >>> s = WeightSchedule("0:0.05,20000:0.07,36000:0.05", base=0.1)
    >>> s(19999), s(20000), s(50000)
    (0.05, 0.07, 0.05)
    """

    def __init__(self, spec: str | None, base: float):
        self.base = float(base)
        self.steps: list[int] = []
        self.values: list[float] = []
        if spec is None or str(spec).strip() == "":
            return
        for token in str(spec).split(","):
            token = token.strip()
            parts = token.split(":")
            if len(parts) != 2:
                raise ValueError(f"weight schedule {spec!r}: token {token!r} is not of the form 'step:value'")
            try:
                step, value = int(parts[0]), float(parts[1])
            except ValueError:
                raise ValueError(
                    f"weight schedule {spec!r}: token {token!r} needs an integer step and a float value"
                ) from None
            if step < 0:
                raise ValueError(f"weight schedule {spec!r}: negative step in {token!r}")
            if self.steps and step <= self.steps[-1]:
                raise ValueError(f"weight schedule {spec!r}: steps must increase ({token!r})")
            self.steps.append(step)
            self.values.append(value)

    def __call__(self, step: int, base: float | None = None) -> float:
        """Value at ``step``; ``base`` (default: the constructor's) applies before the first entry."""
        i = bisect_right(self.steps, int(step))
        if i == 0:
            return self.base if base is None else float(base)
        return self.values[i - 1]

    @property
    def max_value(self) -> float:
        return max([self.base, *self.values])

    def __repr__(self) -> str:
        pairs = ",".join(f"{s}:{v:g}" for s, v in zip(self.steps, self.values))
        return f"WeightSchedule({pairs!r}, base={self.base:g})"
