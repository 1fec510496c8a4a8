"""How `serve` logs: readable lines for a terminal, or one JSON object a line for log shippers.

Log calls that concern one workflow pass `extra={"workflow_id": ..., "task": ...}`; the JSON
lines carry those as fields of their own. Nothing here adds data to a record: what a message
says is what its call site put in it, and no call site logs a secret (docs/security.md).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Final

LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The `extra=` fields a JSON line carries when a call site set them.
CONTEXT_FIELDS: Final = ("workflow_id", "task")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, and
    workflow_id/task when known; an exception's traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """The root logger's one handler (stderr) in `log_format`, replacing any earlier one."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
