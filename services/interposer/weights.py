"""Where interposer weights come from: a local folder (BATON_INTERPOSER_DIR), else the hub.

Only safetensors files are read: a pickled copy of a net (.pt, .pth, .bin, .ckpt) in the
folder is refused with how to convert it, since unpickling can run any code in the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from services.common.errors import NotFound, PickledWeights
from services.interposer.net import PUBLISHED_PAIRS, weights_filename

log = logging.getLogger("baton.interposer")
HUB_SUBFOLDER = "v4.0"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class WeightsLocator:
    """Finds `{src}-to-{dst}_interposer-v4.0.safetensors` for a pair of published ids."""

    def __init__(self, folder: str = "", repo: str = ""):
        self.folder = Path(folder).expanduser() if folder else None
        self.repo = repo

    def local(self, src: str, dst: str) -> Path | None:
        if self.folder is None:
            return None
        path = self.folder / weights_filename(src, dst)
        return path if path.is_file() else None

    def find(self, src: str, dst: str) -> Path:
        """The weights file, downloading it from the hub repo when it is not in the folder."""
        name = weights_filename(src, dst)
        path = self.local(src, dst)
        if path is not None:
            return path
        self._refuse_pickled(name)
        tried = [f"folder {self.folder}" if self.folder else "no folder (set BATON_INTERPOSER_DIR)"]
        if self.repo and os.environ.get("HF_HUB_OFFLINE", "") not in ("1", "true", "yes"):
            from huggingface_hub import hf_hub_download

            try:
                return Path(hf_hub_download(self.repo, name, subfolder=HUB_SUBFOLDER))
            except Exception as exc:  # offline, missing, unauthorised: all mean "not here"
                tried.append(f"hub repo {self.repo}/{HUB_SUBFOLDER} ({type(exc).__name__})")
        elif self.repo:
            tried.append(f"hub repo {self.repo} (offline)")
        raise NotFound(f"the {src}->{dst} interposer needs {name}; looked in: {'; '.join(tried)}")

    def _refuse_pickled(self, name: str) -> None:
        if self.folder is None:
            return
        for suffix in PICKLE_SUFFIXES:
            pickled = self.folder / Path(name).with_suffix(suffix)
            if pickled.is_file():
                raise PickledWeights(
                    f"{pickled} is a pickle, and unpickling can run any code in it; the interposer loads "
                    f"safetensors only. Convert it once, in an environment you trust: load its state dict with "
                    f"torch.load and save it with safetensors.torch.save_file(state_dict, {name!r}) in {self.folder}"
                )

    def available(self) -> list[tuple[str, str, Path]]:
        """Published pairs whose weights are in the local folder."""
        found = []
        for src, dst in PUBLISHED_PAIRS:
            path = self.local(src, dst)
            if path is not None:
                found.append((src, dst, path))
        return found
