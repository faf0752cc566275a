"""`baton up`: a local cluster (Redis + the four services) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "up",
        help="start a local cluster",
        description="Start Redis (unless REDIS_URL is set) and the four services on loopback, wait until "
        "every health check says SERVING, print the addresses, and stop everything on Ctrl-C or SIGTERM.",
    )
    p.add_argument("--log-dir", type=Path, help="write each process's log here instead of this terminal")
    p.add_argument("--json", action="store_true", help="print the addresses as one JSON line")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for SERVING")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.cli.outcome import require_server
    from services.devkit.cluster import ClusterError, LocalCluster

    require_server()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = LocalCluster(
        redis_url=os.environ.get("BATON_REDIS_URL") or os.environ.get("REDIS_URL"),
        log_dir=args.log_dir,
        env={"BATON_LOG_FORMAT": os.environ.get("BATON_LOG_FORMAT", "text")},
    )
    try:
        cluster.start(timeout=args.timeout)
    except ClusterError as exc:
        print(f"baton up: {exc}", file=sys.stderr)
        return 1
    try:
        info = cluster.describe()
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            for name, entry in info.items():
                where = entry.get("url") or entry["address"]
                extra = f"  metrics {entry['metrics']}" if "metrics" in entry else ""
                print(f"{name:<11} {where}{extra}", flush=True)
            print("all services SERVING; Ctrl-C stops the cluster", flush=True)
        while not stop.wait(0.5):
            for name, code in cluster.exited():
                print(f"baton up: {name} exited with {code}", file=sys.stderr)
                return 1
        return 0
    finally:
        cluster.stop()
