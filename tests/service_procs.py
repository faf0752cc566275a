"""Service subprocesses for tests: real `python -m services.<name>` on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from services.cli.cluster import free_port, health_status

REPO = Path(__file__).resolve().parents[1]


class ServiceProcess:
    def __init__(self, name: str, redis_url: str, env: dict[str, str] | None = None, log_path: Path | None = None):
        self.name = name
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "BATON_HOST": "127.0.0.1",
            "BATON_PORT": str(self.port),
            "BATON_METRICS_PORT": str(self.metrics_port),
            "BATON_REDIS_URL": redis_url,
            "BATON_LOG_FORMAT": "text",
            "HF_HUB_OFFLINE": "1",
            **(env or {}),
        }
        self.log_path = log_path
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"], cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
        self.channel: grpc.Channel | None = None

    def wait_serving(self, timeout: float = 120) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        while health_status(self.address) != "SERVING":
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not SERVING after {timeout} s: {self.log_tail()}")
            time.sleep(0.2)
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length", 64 << 20)])
        return self

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path and self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        return {name: float(value) for name, value in samples}

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
