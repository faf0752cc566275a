"""Service subprocesses for tests: devkit's ServiceProcess, started at once, with the tests' environment."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from services.devkit import cluster

REPO = Path(__file__).resolve().parents[1]
# Services under test log as text and never reach for the Hugging Face Hub.
TEST_ENV = {"BATON_LOG_FORMAT": "text", "HF_HUB_OFFLINE": "1"}


class ServiceProcess(cluster.ServiceProcess):
    """`python -m services.<name>` run from the repository (so tests.* plugins import), started;
    wait_serving() waits until it is ready."""

    def __init__(self, name: str, redis_url: str, env: Mapping[str, str] | None = None, log_path: Path | None = None):
        log = log_path if log_path is not None else subprocess.DEVNULL
        super().__init__(name, redis_url, {**TEST_ENV, **(env or {})}, log=log, cwd=REPO)
        self.start()
