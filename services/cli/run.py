"""`baton run job.yaml --out DIR [--gateway ADDR]`: run a job and write its outputs.

Without --gateway it starts a local cluster (Redis and the four services), runs the job on it,
and stops it again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from services.cli.gateway_arg import add_credentials


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run a job spec and write its outputs", description=__doc__)
    p.add_argument("spec", type=Path, help="job spec, YAML or JSON (baton.v1.JobSpec)")
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for the outputs (DIR/<stage>.<format>)")
    p.add_argument(
        "--gateway",
        default=os.environ.get("BATON_GATEWAY") or None,
        help="gateway address [env BATON_GATEWAY]; none: start a local cluster",
    )
    add_credentials(p)
    p.add_argument("--idempotency-key", default="", help="the same key returns the same job")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.common.errors import BatonError
    from services.common.job_files import load_spec
    from services.devkit.cluster import LocalCluster

    try:
        spec = load_spec(args.spec)
    except BatonError as exc:
        print(f"baton run: {exc}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        address = args.gateway
        if address is None:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="baton-logs-")))
            print("starting a local cluster ...", file=sys.stderr, flush=True)
            cluster = stack.enter_context(LocalCluster(log_dir=logs, default_ports=False))
            address = cluster.address("gateway")
        return run_on(address, spec, args.spec.parent, args)


def run_on(address: str, spec, base: Path, args: argparse.Namespace) -> int:
    import grpc

    from services.cli.gateway_arg import client_for
    from services.cli.progress import JobProgress, summary
    from services.common.api.baton.v1 import jobs_pb2 as jpb
    from services.common.errors import BatonError

    with client_for(args, address) as client:
        try:
            spec = client.upload_inputs(spec, base)
            job = client.submit(spec, args.idempotency_key)
        except (grpc.RpcError, BatonError) as exc:
            details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            print(f"baton run: rejected: {details}", file=sys.stderr)
            return 2
        print(f"job {job.id}", file=sys.stderr, flush=True)
        progress = JobProgress(args.quiet)
        try:
            progress.feed(client.watch(job.id))
        except KeyboardInterrupt:
            progress.close()
            client.cancel(job.id, "interrupted by the user")
            print("cancelled", file=sys.stderr)
            return 130
        job = client.get(job.id)
        written = client.download_outputs(job, args.out) if job.state == jpb.JOB_STATE_SUCCEEDED else []
        print(summary(job, written))
        return 0 if job.state == jpb.JOB_STATE_SUCCEEDED else 1
