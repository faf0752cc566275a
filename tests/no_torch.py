"""`python tests/no_torch.py MODULE ARGS...` (or `runpy_file SCRIPT ARGS...`): run a module or a
script as a client-only install would, with the server's packages (torch, diffusers, redis, ...)
unimportable, so that any import of them fails."""

from __future__ import annotations

import runpy
import sys

SERVER_ONLY = ("torch", "diffusers", "transformers", "accelerate", "redis", "xxhash", "prometheus_client", "scipy")


class Blocked:
    """A meta path finder that refuses the server-only packages."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in SERVER_ONLY:
            raise ModuleNotFoundError(f"No module named {name!r} (a client-only install)", name=name)
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, Blocked())
    if sys.argv[1] == "runpy_file":  # a script rather than a module
        sys.argv = sys.argv[2:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        module, sys.argv = sys.argv[1], sys.argv[1:]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
