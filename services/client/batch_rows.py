"""The rows of a batch: a JSONL file (one JSON object of overrides a line) or a CSV file (a header
of override paths, then a row a line), read lazily and numbered from 1; a row that cannot be read
is a BadRow, which fails that row alone."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument

COUNT_LIMIT_BYTES = 64 << 20  # rows files up to this size are counted for the progress bar


@dataclass
class BadRow:
    """A row that could not be read (not a JSON object, more cells than the header): a failed row."""

    text: str
    why: str


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """The rows of a JSONL or CSV file, numbered from 1 (blank lines and the CSV header do not
    count), read lazily. CSV cells are text; an empty cell is no override."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv"):
        raise InvalidArgument(f"{path}: a rows file is .jsonl (one JSON object a line) or .csv (a header of paths)")
    try:
        handle = path.open(encoding="utf-8", newline="" if suffix == ".csv" else None)
    except FileNotFoundError as e:
        raise InvalidArgument(f"{path}: no such file") from e
    if suffix != ".csv":
        return _jsonl_rows(handle)
    reader = csv.reader(handle)
    header = next(reader, [])
    if not header or any(not name.strip() for name in header) or len(set(header)) != len(header):
        handle.close()
        raise InvalidArgument(f"{path}: the first line must name each column once (override paths), got {header}")
    return _csv_rows(handle, reader, [name.strip() for name in header])


def _jsonl_rows(handle: Any) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    with handle:
        n = 0
        for line in handle:
            if not line.strip():
                continue
            n += 1
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, BadRow(line.strip(), f"not valid JSON: {e}")
                continue
            yield n, value if isinstance(value, dict) else BadRow(line.strip(), "a row is a JSON object of overrides")


def _csv_rows(handle: Any, reader: Any, header: list[str]) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    with handle:
        for n, cells in enumerate(reader, 1):
            if len(cells) > len(header):
                yield n, BadRow(",".join(cells), f"{len(cells)} cells, but the header names {len(header)} columns")
            else:
                yield n, {name: cell for name, cell in zip(header, cells, strict=False) if cell != ""}


def count_rows(path: Path) -> int | None:
    """How many rows read_rows gives, for a file small enough to count; None otherwise."""
    path = Path(path)
    try:
        if path.stat().st_size > COUNT_LIMIT_BYTES:
            return None
        with path.open(encoding="utf-8", newline="") as f:
            if path.suffix.lower() == ".csv":
                return max(sum(1 for _ in csv.reader(f)) - 1, 0)
            return sum(1 for line in f if line.strip())
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
