"""`baton submit job.yaml`: queue a job and print its id (uploading its input files first)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.cli.gateway_arg import add_gateway, client_for


def register(subparsers) -> None:
    p = subparsers.add_parser("submit", help="queue a job and print its id", description=__doc__)
    p.add_argument("spec", type=Path)
    p.add_argument("--idempotency-key", default="", help="the same key returns the same job")
    add_gateway(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import grpc

    from services.common.errors import BatonError
    from services.common.job_files import load_spec

    try:
        with client_for(args) as client:
            spec = client.upload_inputs(load_spec(args.spec), args.spec.parent)
            print(client.submit(spec, args.idempotency_key).id)
    except grpc.RpcError as exc:
        print(f"baton submit: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except BatonError as exc:
        print(f"baton submit: {exc}", file=sys.stderr)
        return 2
    return 0
