"""The rules of every stage kind, once: plain functions on plain values (no gRPC, no torch).

The gateway's planner runs them at Submit, before any GPU work, and each worker runs the same
functions on the requests it is sent. A rule raises InvalidArgument naming the field as the
stage body spells it (`steps`, `denoising_start`); the caller adds where it sits (the planner
prefixes `denoise.` and names the stage), so both sides refuse the same inputs with the same
field, and tests/test_rule_parity.py holds them to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from services.common.errors import BatonError


@contextmanager
def located(*, stage: str = "", prefix: str = "") -> Iterator[None]:
    """Re-raises a rule's error at `stage`, its field under `prefix` (e.g. "denoise.")."""
    try:
        yield
    except BatonError as exc:
        field = prefix + exc.field if exc.field else prefix.rstrip(".")
        raise exc.at(stage=stage, field=field) from exc
