"""StepTimes: how long a step of each model takes lately, for the stall timeout.

A stage is cancelled and retried elsewhere when its worker sends no step event for
max(floor, FACTOR x the model's recent step time): slow models get room, and a worker that
hangs is noticed in a small multiple of a step instead of at the job's deadline.
"""

from __future__ import annotations

# A step this many times slower than usual is a stall.
FACTOR = 10.0
# Weight of the newest observation in the moving average.
ALPHA = 0.2


class StepTimes:
    def __init__(self) -> None:
        self._mean: dict[str, float] = {}

    def observe(self, model: str, seconds: float) -> None:
        mean = self._mean.get(model)
        self._mean[model] = seconds if mean is None else (1 - ALPHA) * mean + ALPHA * seconds

    def mean(self, model: str) -> float | None:
        return self._mean.get(model)

    def stall_timeout(self, model: str, stepped: bool, floor_s: float) -> float:
        """Seconds a window may stay silent: the floor until its first step, then the step-based bound."""
        mean = self._mean.get(model)
        if not stepped or mean is None:
            return floor_s
        return max(floor_s, FACTOR * mean)
