"""`baton run job.yaml --out DIR [--gateway ADDR]`: run a job and write its outputs.

Without --gateway (or BATON_GATEWAY) it starts a local cluster (Redis and the four services) for
this run and stops it again; its logs are deleted after a success and kept, and named, otherwise.
The run owns its job: Ctrl-C cancels it. Progress goes to stderr, the summary to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    p.add_argument(
        "--previews",
        type=Path,
        metavar="DIR",
        help="write each step preview as it arrives to DIR/<stage>/step-<n>.png (needs preview_every in "
        "the spec, or --preview-every)",
    )
    p.add_argument(
        "--preview-every",
        type=steps,
        metavar="N",
        help="set preview_every on every denoise stage: a preview every N steps and at the stage's last "
        "(0: none); overrides the spec",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="keep the local cluster's process logs here (default: a temporary folder, kept only when the run fails)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (the job id and errors still)")
    p.set_defaults(func=run)


def steps(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a step count (0 or more), got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from services.common.job_files import load_spec

    spec = load_spec(args.spec)
    if args.preview_every is not None:
        for stage in spec.stages:
            if stage.WhichOneof("kind") == "denoise":
                stage.denoise.preview_every = args.preview_every
    if args.gateway is not None:
        return run_on(args.gateway, spec, args, local=False)
    return run_locally(spec, args)


def run_locally(spec, args: argparse.Namespace) -> int:
    """Runs the job on a local cluster started for it."""
    import shutil
    import tempfile

    from services.cli.outcome import require_server
    from services.common.errors import FailedPrecondition
    from services.devkit.cluster import ClusterError, LocalCluster

    require_server()  # the services would only fail later, in other processes
    logs = args.log_dir or Path(tempfile.mkdtemp(prefix="baton-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    code, named = None, False
    try:
        print("starting a local cluster ...", file=sys.stderr, flush=True)
        try:
            cluster = LocalCluster(log_dir=logs, default_ports=False).start()
        except ClusterError as exc:
            named = True
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FailedPrecondition(f"the local cluster did not start: {first}; its logs are in {logs}") from exc
        try:
            code = run_on(cluster.address("gateway"), spec, args, local=True)
        finally:
            cluster.stop()
        return code
    finally:
        if code == 0 and args.log_dir is None:
            shutil.rmtree(logs, ignore_errors=True)
        elif code != 0 and not named:
            print(f"baton run: the local cluster's logs are in {logs}", file=sys.stderr)


def run_on(address: str, spec, args: argparse.Namespace, local: bool) -> int:
    from services.cli import outcome
    from services.cli.gateway_arg import client_for
    from services.cli.progress import JobProgress, summary
    from services.cli.watch import EventStream
    from services.common.api.baton.v1 import jobs_pb2 as jpb

    with client_for(args, address) as client:
        # Refusals (INVALID_ARGUMENT naming the stage and field) end the verb through main.
        spec = client.upload_inputs(spec, args.spec.parent)
        job = client.submit(spec, args.idempotency_key)
        print(f"job {job.id}", file=sys.stderr, flush=True)
        stream = EventStream(client.watch(job.id), previews=args.previews)
        progress = JobProgress(args.quiet)
        try:
            progress.feed(stream)
        except KeyboardInterrupt:
            progress.close()
            print(f"baton run: interrupted; {cancel(client, job.id, '' if local else address)}", file=sys.stderr)
            return outcome.INTERRUPTED
        job = client.get(job.id)
        written = client.download_outputs(job, args.out) if job.state == jpb.JOB_STATE_SUCCEEDED else []
        print(summary(job, written) + stream.previews_line())
        return outcome.OK if job.state == jpb.JOB_STATE_SUCCEEDED else outcome.JOB_FAILED


def cancel(client, job_id: str, remote: str) -> str:
    """Cancels the run's job; says what became of it (on `remote`, the gateway, if not local)."""
    import grpc

    from services.cli.progress import job_state

    where = f" on {remote}" if remote else ""
    client.timeout = 15.0  # the gateway waits up to 5 s for the job to stop
    try:
        job = client.cancel(job_id, "interrupted (Ctrl-C in baton run)")
    except grpc.RpcError as exc:  # say how to finish what the run could not
        if not remote:  # Ctrl-C on a terminal reached the local services too
            return f"job {job_id} stops with the local cluster"
        return f"could not cancel job {job_id}{where} ({exc.code().name}: {exc.details()}); `baton cancel {job_id}`"
    state = job_state(job.state)
    if state == "cancelled":
        return f"cancelled job {job_id}{where}"
    if state in ("queued", "running"):
        return f"asked to cancel job {job_id}{where} (still {state})"
    return f"job {job_id} had {state}"
