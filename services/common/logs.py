"""Structured logs: one JSON object per line (or plain text for people).

Every line logged while a stage is handled (on the gateway, inside the stage's run; on a worker,
inside the call) carries `job_id` and `stage`, and `trace_id` whenever there is a trace, from the
OpenTelemetry context (tracing.log_fields): no call site passes them. A field a call passes
itself (`extra=`) is kept as passed.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from services.common.tracing import log_fields

# Attributes every LogRecord has; anything else was passed through `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class ContextFields(logging.Filter):
    """Adds the current job, stage and trace to a record, unless it names them already."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in log_fields().items():
            if key not in vars(record):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        line = f"{line} {fields}" if fields else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFields())  # on the handler: it sees every logger's records
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
