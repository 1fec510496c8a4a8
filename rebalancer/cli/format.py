"""Output for people and scripts: aligned tables, JSON, money, times and event lines."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from events.vocabulary import WorkflowState


def json_default(value: Any) -> Any:
    """JSON for what events and read models hold: datetimes as ISO 8601, Decimals as strings."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=json_default))


def money(value: Decimal | None) -> str:
    """A Decimal as a plain string: no exponent, no trailing zeros."""
    if value is None:
        return ""
    text = f"{value.normalize():f}"
    return "0" if text in ("-0", "0") else text


def jsonable(value: Any) -> Any:
    """Decimals (as money) and datetimes as strings, recursively, for `--json` output."""
    if isinstance(value, Decimal):
        return money(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def to_json(value: Any) -> str:
    return json.dumps(jsonable(value), indent=2)


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    right: frozenset[int] = frozenset(),
    rule: bool = False,
) -> str:
    """Plain aligned columns (those in `right` right-aligned), optionally a rule under the
    header; trailing blanks are cut, so a left-aligned last column is left ragged."""
    lines = [[str(cell) for cell in header], *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    if rule:
        lines.insert(1, ["-" * width for width in widths])

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=False))
        ).rstrip()

    return "\n".join(line(cells) for cells in lines)


def when(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.isoformat(sep=" ", timespec="milliseconds")


KEY_FIELDS = (
    "amount", "currency", "from_account", "to_account", "account", "network", "txid",
    "client_id", "id", "status",
)


def key_fields(payload: dict[str, Any] | None) -> str:
    """`amount=... currency=... txid=...`: the first (shallowest) value of each key field."""
    if not payload:
        return ""
    found: dict[str, Any] = {}
    level: list[dict[str, Any]] = [payload]
    while level:
        deeper: list[dict[str, Any]] = []
        for item in level:
            for key, value in item.items():
                if isinstance(value, dict):
                    deeper.append(value)
                elif key in KEY_FIELDS and key not in found and value is not None:
                    found[key] = value
        level = deeper
    return " ".join(f"{key}={found[key]}" for key in KEY_FIELDS if key in found)


def error_text(error: dict[str, Any] | None) -> str:
    if not error:
        return ""
    message = str(error.get("message") or error)
    return f"{message} ({error['code']})" if error.get("code") else message


def short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=json_default)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def move_text(data: dict[str, Any]) -> str:
    """`source -> dest` of a state change, `created` for the event that creates a workflow."""
    if "dest" not in data:
        return WorkflowState.CREATED.value
    return f"{data.get('source')} -> {data.get('dest')}"


def progress_line(event: Any) -> str:
    """One line per relayed event: time, short workflow id, version, task, trigger, move."""
    data = event.data
    what = data.get("task_name") or "workflow"
    return (f"{event.recorded_at:%H:%M:%S} {event.stream_id.removeprefix('workflow-')[:8]}"
            f" v{event.version:<3} {what:<24} {data.get('trigger', ''):<11} {move_text(data)}")
