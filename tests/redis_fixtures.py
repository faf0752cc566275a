"""Real Redis servers for tests: a single server and a 3-master Redis Cluster."""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from services.cli.cluster import free_port, port_is_free
from services.cli.redis_server import redis_argv, wait_for_ping


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A single redis-server; yields its URL."""
    port = free_port()
    process = subprocess.Popen(redis_argv(port, workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_ping(port, process)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def redis_cluster(workdir: Path, masters: int = 3) -> Iterator[str]:
    """A Redis Cluster of `masters` nodes, no replicas; yields the first node's URL."""
    ports = _cluster_ports(masters)
    processes = []
    try:
        for port in ports:
            node_dir = workdir / str(port)
            node_dir.mkdir(parents=True)
            argv = redis_argv(
                port, node_dir, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000",
            )  # fmt: skip
            processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port, process in zip(ports, processes, strict=True):
            wait_for_ping(port, process)
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        _wait_cluster_ok(ports)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


def _cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (port + 10000) is valid and free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 50000)
        if port not in ports and port_is_free(port) and port_is_free(port + 10000):
            ports.append(port)
    return ports


def _wait_cluster_ok(ports: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [redis.Redis(port=p).cluster("info").get("cluster_state") for p in ports]
        if all(s == "ok" for s in states):
            return
        time.sleep(0.1)
    raise RuntimeError(f"Redis Cluster on {ports} not ok after {timeout} s")
