"""How a verb ends: its exit code and the one line it prints when it fails.

Every verb ends through here, so scripts can rely on the codes (EXIT_CODES, also in `baton
--help` and the README) and people get one line, `baton VERB: CODE: message; hint`, instead of
a traceback (`--debug` or BATON_DEBUG=1 shows the traceback too).
"""

from __future__ import annotations

import sys

OK, JOB_FAILED, BAD_INPUT, UNAVAILABLE, BUG, INTERRUPTED = 0, 1, 2, 3, 4, 130

EXIT_CODES = """\
  0    done (a job that ran succeeded)
  1    the job ran and failed or was cancelled (batch: some rows failed)
  2    bad input: a spec, file, flag, id or credentials refused, or something that does not exist
  3    unavailable: nothing answers, a busy or restarting cluster, a deadline passed; try again
  4    a bug: INTERNAL or UNKNOWN (please report it with the --debug output)
  130  interrupted (Ctrl-C); a job goes on running on the cluster unless the verb says it cancelled it"""

# gRPC status names by what the user can do about them.
_BY_CODE = {
    "INVALID_ARGUMENT": BAD_INPUT,
    "NOT_FOUND": BAD_INPUT,
    "FAILED_PRECONDITION": BAD_INPUT,
    "ALREADY_EXISTS": BAD_INPUT,
    "OUT_OF_RANGE": BAD_INPUT,
    "UNAUTHENTICATED": BAD_INPUT,
    "PERMISSION_DENIED": BAD_INPUT,
    "UNIMPLEMENTED": BAD_INPUT,
    "UNAVAILABLE": UNAVAILABLE,
    "DEADLINE_EXCEEDED": UNAVAILABLE,
    "RESOURCE_EXHAUSTED": UNAVAILABLE,
    "ABORTED": UNAVAILABLE,
    "CANCELLED": UNAVAILABLE,
}
# Modules only the services need: a client-only install lacks them.
SERVER_MODULES = (
    *("torch", "diffusers", "transformers", "accelerate", "scipy"),
    *("redis", "xxhash", "prometheus_client", "grpc_reflection"),
)


def exit_code(status: str) -> int:
    return _BY_CODE.get(status, BUG)


def hint(status: str, message: str, gateway: str) -> str:
    """What the user can do next, where Baton can tell; "" otherwise."""
    if status == "UNAVAILABLE" and _no_connection(message):
        return "is a cluster running? start one with `baton up`, or pass --gateway / set BATON_GATEWAY"
    if status == "UNAUTHENTICATED":
        return "pass --token (or set BATON_TOKEN), over TLS (--ca / BATON_CA)"
    if status == "NOT_FOUND" and "job " in message:
        return "`baton ls` lists your jobs"
    if status == "UNIMPLEMENTED":
        return "the gateway is older than this client; upgrade it"
    return ""


def _no_connection(message: str) -> bool:
    text = message.lower()
    return any(s in text for s in ("failed to connect", "connection refused", "dns resolution failed", "unreachable"))


def describe(status: str, message: str, gateway: str) -> str:
    """The message to print after `baton VERB: STATUS: `: gRPC's connection noise says only what failed."""
    if status == "UNAVAILABLE" and _no_connection(message):
        why = "connection refused" if "refused" in message.lower() else message.rsplit(": ", 1)[-1]
        message = f"nothing answers at {gateway or 'the gateway'} ({why})"
    found = hint(status, message, gateway)
    return f"{message}; {found}" if found else message


def fail(verb: str, status: str, message: str, gateway: str = "") -> int:
    """Prints the verb's one-line failure and returns its exit code."""
    text = " ".join(describe(status, message, gateway).split())  # one line, whatever the server sent
    print(f"baton {verb}: {status}: {text}", file=sys.stderr)
    return exit_code(status)


def require_server() -> None:
    """For verbs that start services (in other processes, which would only fail later): the
    ModuleNotFoundError of the first service package this install lacks."""
    from importlib.util import find_spec

    for name in ("torch", "diffusers", "redis"):
        if find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def missing_server(verb: str, exc: ModuleNotFoundError) -> int | None:
    """A verb that runs services on an install without them: say which extra brings them."""
    if (exc.name or "").split(".")[0] not in SERVER_MODULES:
        return None
    print(
        f"baton {verb}: FAILED_PRECONDITION: needs {exc.name}, which a client-only install lacks; "
        "install the services with: pip install 'baton[server]'",
        file=sys.stderr,
    )
    return BAD_INPUT
