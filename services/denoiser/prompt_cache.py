"""PromptCache: a model's text-encoder outputs, kept by what they were encoded from.

Every window encodes its prompts before its first step, and the windows of one job (a split,
a retry, a batch of rows with one negative prompt) mostly encode the same texts again: on Flux,
a T5-XXL pass per window. The cache keeps each model's outputs keyed by the encoder call and its
arguments (the prompts, negative prompts, sequence length, images per prompt, guidance mode), the
least recently used going first past a bound in bytes. Values are the encoders' own tensors,
handed to every window that asks: windows read them and never write them.

Encoding also runs under the cache's lock: Hugging Face's fast tokenizers set their padding and
truncation on the shared Rust tokenizer for each call, so two windows tokenizing at once (they do,
now that windows on one model run together) can get each other's padding.

What else an encoding depends on (a window's textual inversions and text-encoder LoRAs:
adapters.py) comes from `encoding_with`, set around the window: it joins the key, and its
context manager runs around the encoders on a miss.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import torch

from services.denoiser import metrics

T = TypeVar("T")
DEFAULT_BYTES = 256 << 20

_with: ContextVar[tuple[Hashable, Callable[[], contextlib.AbstractContextManager[Any]]] | None] = ContextVar(
    "encoding_with", default=None
)


@contextlib.contextmanager
def encoding_with(key: Hashable, around: Callable[[], contextlib.AbstractContextManager[Any]]) -> Iterator[None]:
    """The encodings in this block (this thread) depend on `key` too and run inside `around()`."""
    token = _with.set((key, around))
    try:
        yield
    finally:
        _with.reset(token)


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in `value` (nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple | list):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


class PromptCache:
    def __init__(self, max_bytes: int = DEFAULT_BYTES, model: str = ""):
        self.max_bytes = max_bytes
        self.model = model
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def encode(self, key: Hashable, encode: Callable[[], T]) -> T:
        """The cached outputs for `key`, or `encode()`'s, kept when they fit."""
        extra = _with.get()
        if extra is not None:
            key = (key, extra[0])
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                metrics.prompt_cache_hit(self.model)
                return found[0]
            if extra is None:
                value = encode()
            else:
                with extra[1]():
                    value = encode()
            metrics.prompt_cache_miss(self.model)
            size = tensor_bytes(value)
            if size <= self.max_bytes:
                self._entries[key] = (value, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, dropped) = self._entries.popitem(last=False)
                    self._bytes -= dropped
            return value

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
