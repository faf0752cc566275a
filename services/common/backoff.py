"""Exponential backoff with full jitter: what every Baton retry loop waits between tries.

Full jitter (a uniform draw up to the exponential bound) keeps many callers that failed
together, e.g. every job of a burst finding the denoisers busy, from retrying together.
"""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, base_s: float = 0.05, cap_s: float = 2.0):
        self.base_s = base_s
        self.cap_s = cap_s
        self.tries = 0

    def next(self) -> float:
        """Seconds to wait before the next try."""
        bound = min(self.cap_s, self.base_s * (2**self.tries))
        self.tries += 1
        return random.uniform(bound / 2, bound) if self.tries == 1 else random.uniform(0, bound)

    def reset(self) -> None:
        self.tries = 0
