"""`baton workers`: the registered workers, draining ones included: kind, address, whether it
takes new work, its load, device, models and how long ago it last reported. Admin only."""

from __future__ import annotations

import argparse
import time

from services.cli.gateway_arg import add_gateway, client_for


def register(subparsers) -> None:
    p = subparsers.add_parser("workers", help="list the registered workers (admin)", description=__doc__)
    add_gateway(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.cli.table import table

    with client_for(args) as client:
        workers = client.list_workers()
    now = time.time()
    rows = [
        (
            w.kind,
            w.address,
            "yes" if w.accepting else "draining",
            f"{w.in_flight}/{w.capacity}",
            f"{w.queued}/{w.max_queued}",
            w.device or "-",
            ", ".join(m.name for m in w.models) or "-",
            _age(w.heartbeat_at.ToNanoseconds() / 1e9, now),
        )
        for w in workers
    ]
    print(table(("KIND", "ADDRESS", "ACCEPTING", "RUNNING", "QUEUED", "DEVICE", "MODELS", "HEARTBEAT"), rows))
    return 0


def _age(at: float, now: float) -> str:
    """How long ago a heartbeat was, in seconds; "-" when the record has none."""
    return f"{max(now - at, 0):.0f} s ago" if at > 0 else "-"
