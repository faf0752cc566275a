"""`baton models [--json]`: the models the cluster's denoisers hold or can load by name, the
state where each stands best, and the workers that name it."""

from __future__ import annotations

import argparse

from services.cli.gateway_arg import add_gateway, client_for


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the cluster's models", description=__doc__)
    p.add_argument("--json", action="store_true", help="one JSON object (a ClusterModel) per line")
    add_gateway(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToJson

    from services.cli.table import size, table
    from services.common.api.baton.v1 import denoiser_pb2 as dpb

    with client_for(args) as client:
        models = client.list_models()
    if args.json:
        for entry in models:
            print(MessageToJson(entry, preserving_proto_field_name=True, indent=None))
        return 0
    rows = [
        (
            m.model.name,
            dpb.ModelState.Name(m.model.state).removeprefix("MODEL_STATE_").lower(),
            m.model.family,
            m.model.space,
            size(m.model.memory_bytes),
            ", ".join(m.workers),
        )
        for m in models
    ]
    print(table(("NAME", "STATE", "FAMILY", "SPACE", "MEMORY", "WORKERS"), rows))
    return 0
