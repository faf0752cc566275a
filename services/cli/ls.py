"""`baton ls [--state STATE]`: recent jobs, newest first."""

from __future__ import annotations

import argparse
import itertools

from services.cli.gateway_arg import add_gateway, client_for

STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def register(subparsers) -> None:
    p = subparsers.add_parser("ls", help="list jobs", description=__doc__)
    p.add_argument("--state", choices=STATES, help="only jobs in this state")
    p.add_argument("--limit", type=int, default=50, help="at most this many jobs")
    add_gateway(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.cli.progress import job_state
    from services.common.api.baton.v1 import jobs_pb2 as jpb

    state: jpb.JobState = getattr(jpb, f"JOB_STATE_{args.state.upper()}") if args.state else jpb.JOB_STATE_UNSPECIFIED
    with client_for(args) as client:
        for job in itertools.islice(client.list(state), args.limit):
            created = job.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            where = f" #{job.queue_position}" if job.queue_position else ""
            print(f"{job.id}  {job_state(job.state) + where:<10} {created}  {job.spec.name}  {job.error}".rstrip())
    return 0
