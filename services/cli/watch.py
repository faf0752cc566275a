"""`baton watch JOB [--after EVENT_ID]`: follow a job's progress until it ends."""

from __future__ import annotations

import argparse

from services.cli.gateway_arg import add_gateway, client_for


def register(subparsers) -> None:
    p = subparsers.add_parser("watch", help="follow a job until it ends", description=__doc__)
    p.add_argument("job_id")
    p.add_argument("--after", default="", help="resume after this event id")
    p.add_argument("--events", action="store_true", help="print every event as a JSON line instead of bars")
    add_gateway(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToJson

    from services.cli.progress import JobProgress, summary
    from services.common.api.baton.v1 import jobs_pb2 as jpb

    with client_for(args) as client:
        events = client.watch(args.job_id, args.after)
        if args.events:
            for event in events:
                print(MessageToJson(event, indent=None, preserving_proto_field_name=True), flush=True)
        else:
            JobProgress().feed(events)
        job = client.get(args.job_id)
    if not args.events:
        print(summary(job, []))
    return 0 if job.state == jpb.JOB_STATE_SUCCEEDED else 1
