"""`--log-json`: one JSON object per log line, for log shippers.

Records carry the fields the access log adds (route, status, duration_ms, escrow_id,
hold_id, agent_id, error). Secrets never reach a line: anything shaped like an API key
(`hfe_...`), a spend token (`est_...`) or a bearer header is replaced before writing,
whatever logged it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_SECRET = re.compile(r"\b(?:hfe|est)_[A-Za-z0-9_\-]{8,}|(?i:bearer)\s+\S+")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    return _SECRET.sub(REDACTED, text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "pid": record.process,
                "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(line, default=str))


def configure_json_logging(level: int = logging.INFO) -> None:
    """Send every logger's records to stderr as JSON lines, and only there (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler.formatter, JsonFormatter):
            return
        root.removeHandler(handler)  # a line in another format would break the shipper's parsing
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(min(root.level, level) if root.level else level)
