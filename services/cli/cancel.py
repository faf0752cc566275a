"""`baton cancel JOB`: cancel a job; its workers stop at their next step (or within one block)."""

from __future__ import annotations

import argparse

from services.cli.gateway_arg import add_gateway, client_for


def register(subparsers) -> None:
    p = subparsers.add_parser("cancel", help="cancel a job", description=__doc__)
    p.add_argument("job_id")
    p.add_argument("--reason", default="cancelled from the command line", help="recorded as the job's error")
    add_gateway(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.cli.progress import job_state

    with client_for(args) as client:
        job = client.cancel(args.job_id, args.reason)
    print(f"{job.id} {job_state(job.state)}")
    return 0
