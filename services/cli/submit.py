"""`baton submit job.yaml`: queue a job and print its id (uploading its input files first)."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.cli.gateway_arg import add_gateway, client_for


def register(subparsers) -> None:
    p = subparsers.add_parser("submit", help="queue a job and print its id", description=__doc__)
    p.add_argument("spec", type=Path, help="job spec, YAML or JSON (baton.v1.JobSpec)")
    p.add_argument("--idempotency-key", default="", help="the same key returns the same job (another spec: refused)")
    add_gateway(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.common.job_files import load_spec

    spec = load_spec(args.spec)
    with client_for(args) as client:
        spec = client.upload_inputs(spec, args.spec.parent)
        print(client.submit(spec, args.idempotency_key).id)
    return 0
