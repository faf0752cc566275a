"""How long a CLI verb takes from exec to exit, against `python -c pass` in the same run.

    .venv/bin/python -m bench.cli_start [--repeat 7]

A gateway (and Redis) runs on loopback, with no worker: the verbs' own cost is the point. Each
command runs `--repeat` times as a fresh process; the median wall time is printed with its ratio
to `python -c pass` and the difference. For scale, `python -c "import torch"` is printed too:
what every verb paid while the client imported torch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.timing import median_time
from services.devkit.cluster import LocalCluster


def timed(command: list[str], repeat: int) -> float:
    def once() -> None:
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    once()  # warm the page cache
    return median_time(once, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as logs, LocalCluster(["gateway"], log_dir=Path(logs), default_ports=False) as c:
        gateway = ["--gateway", c.address("gateway")]
        baton = [python, "-m", "services.cli.main"]
        commands = {
            "python -c pass": [python, "-c", "pass"],
            "baton --version": [*baton, "--version"],
            "baton ls": [*baton, "ls", *gateway],
            "baton get JOB (unknown)": [*baton, "get", "0" * 32, *gateway],
            "baton cancel JOB (unknown)": [*baton, "cancel", "0" * 32, *gateway],
            'python -c "import torch"': [python, "-c", "import torch"],
        }
        times = {name: timed(command, args.repeat) for name, command in commands.items()}
    base = times["python -c pass"]
    print(f"{'command':<28} {'median s':>9} {'x pass':>8} {'+ s':>7}   ({args.repeat} runs each)")
    for name, seconds in times.items():
        print(f"{name:<28} {seconds:9.3f} {seconds / base:8.1f} {seconds - base:7.3f}")


if __name__ == "__main__":
    main()
