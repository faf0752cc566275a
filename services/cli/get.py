"""`baton get JOB [--out DIR]`: a job's record as JSON on stdout; with --out, its outputs written too.

stdout is the JSON alone (pipe it to jq); the paths written go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.cli.gateway_arg import add_gateway, client_for


def register(subparsers) -> None:
    p = subparsers.add_parser("get", help="show a job (and download its outputs)", description=__doc__)
    p.add_argument("job_id")
    p.add_argument("--out", type=Path, help="write the job's outputs here (DIR/<stage>.<format>)")
    add_gateway(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToJson

    with client_for(args) as client:
        job = client.get(args.job_id)
        print(MessageToJson(job, preserving_proto_field_name=True), flush=True)
        if args.out:
            for path in client.download_outputs(job, args.out):
                print(f"wrote {path}", file=sys.stderr)
    return 0
