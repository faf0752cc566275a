"""Which models a request may name: the denoiser's `model-sources` setting.

Loading a model reads files on the worker and downloads from the hub, so a request may name,
beyond the configured models (the `models` aliases and `preload`), only the sources that the
setting allows: comma-separated patterns, each one of

- an absolute folder: a local folder or .safetensors file whose real path (symlinks and `..`
  followed) lies inside it, so `/models/../etc` and a link in /models to /etc are outside;
- `hub:org/*`: any Hugging Face repo of that organisation; `hub:org/name`: that repo;
  `hub:*`: any repo.

Empty, the default, allows the configured models only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import FailedPrecondition

SETTING = "model-sources"
ENV = "BATON_MODEL_SOURCES"
HUB = "hub:"

# Hugging Face's repo names: letters, digits, '_', '-', '.'; not starting or ending with '-' or '.'.
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")
_HUB_ID_MAX = 96


class ModelSourceRefused(FailedPrecondition):
    """A request names a model that is not configured and that `model-sources` does not allow."""


def is_hub_id(text: str) -> bool:
    """Whether `text` is a valid `org/name` hub repo id ('..' and '--' are not)."""
    return len(text) <= _HUB_ID_MAX and bool(_HUB_ID.fullmatch(text)) and ".." not in text and "--" not in text


@dataclass(frozen=True)
class ModelSources:
    """The parsed setting: real local roots, hub patterns, and the configured names always allowed."""

    roots: tuple[Path, ...] = ()
    hub: tuple[str, ...] = ()
    configured: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str, configured: Iterable[str] = ()) -> ModelSources:
        """The setting's patterns; ValueError names the first one that is neither form."""
        roots, hub = [], []
        for item in filter(None, (part.strip() for part in text.split(","))):
            if item.startswith(HUB):
                pattern = item.removeprefix(HUB)
                org, _, repo = pattern.partition("/")
                if not (pattern == "*" or is_hub_id(pattern) or (repo == "*" and is_hub_id(f"{org}/x"))):
                    raise ValueError(f"{item!r}: hub patterns are hub:org/*, hub:org/name or hub:*")
                hub.append(pattern)
            elif Path(item).expanduser().is_absolute():
                roots.append(Path(item).expanduser().resolve())
            else:
                raise ValueError(f"{item!r} is neither an absolute folder nor a hub:org/* or hub:org/name pattern")
        return cls(tuple(roots), tuple(hub), frozenset(configured))

    def describe(self) -> str:
        patterns = [*map(str, self.roots), *(HUB + p for p in self.hub)]
        return ", ".join(patterns) or "no other source"


def local_path(source: str) -> Path | None:
    """The path the loader reads `source` from, or None for a hub id: like models.load_model, a
    name is a hub id only when it is one and no file or folder of that name is there."""
    path = Path(source).expanduser()
    if path.is_absolute() or path.exists() or not is_hub_id(source):
        return path
    return None


def allowed(name: str, sources: ModelSources) -> bool:
    """Whether a request may name `name`: a configured model, or a source `sources` allows."""
    if name in sources.configured:
        return True
    path = local_path(name)
    if path is not None:
        real = path.resolve()
        return any(real.is_relative_to(root) for root in sources.roots)
    org = name.split("/")[0]
    return any(pattern in ("*", name, f"{org}/*") for pattern in sources.hub)


def admit(name: str, sources: ModelSources) -> str:
    """The source to load `name` from (a local one by its real path, so that a link swapped after
    this check is not followed); ModelSourceRefused, naming the field and the setting, when not allowed."""
    if not allowed(name, sources):
        known = sorted(sources.configured)
        listed = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        raise ModelSourceRefused(
            f"model {name!r} is not one of this denoiser's models ({listed or 'none'}), and its "
            f"{SETTING} setting ({ENV}) allows {sources.describe()}; name a configured model, or have the "
            f"operator add its folder or hub:org/* to {SETTING}",
            field="model",
        )
    path = None if name in sources.configured else local_path(name)
    return str(path.resolve()) if path is not None else name
