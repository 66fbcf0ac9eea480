"""Structured logs: a sentence plus fields (`action`, ids), as text or one JSON object per line."""

from __future__ import annotations

import datetime
import json
import logging
import sys

# Attributes every LogRecord has; anything else on a record came from `extra=`.
# uvicorn adds `color_message`, a copy of the message with terminal colour codes.
_STANDARD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName", "color_message"}


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """Return the structured fields passed with `extra=`."""
    return {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRIBUTES}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **record_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = record_fields(record)
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return text


def configure(level: str = "INFO", *, json_lines: bool = False) -> None:
    """Send the project's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # One line per HTTP request from httpx is too much at INFO for a fleet of runners.
    logging.getLogger("httpx").setLevel(logging.WARNING)
