"""Runs a throwaway redis-server on loopback (the local cluster and the tests use it)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path


class RedisServerError(RuntimeError):
    pass


def redis_argv(port: int, workdir: Path, *extra: str) -> list[str]:
    """argv of a redis-server with no persistence, bound to loopback."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisServerError(
            "no redis-server on PATH: install it (`apt-get install redis-server`, `brew install redis`, "
            "or `make setup` as root) or set REDIS_URL to a running Redis"
        )
    return [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--protected-mode", "yes", *extra,
    ]  # fmt: skip


def ping(port: int, timeout: float = 0.2) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False


def wait_for_ping(port: int, process: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RedisServerError(f"redis-server on port {port} exited with {process.returncode}")
        if ping(port):
            return
        time.sleep(0.05)
    raise RedisServerError(f"redis-server on port {port} did not answer PING within {timeout:.0f} s")
