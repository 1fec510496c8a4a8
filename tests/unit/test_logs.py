"""`serve`'s log formats: readable text, or one JSON object a line for log shippers."""

from __future__ import annotations

import json
import logging

import pytest

from rebalancer.logs import JsonFormatter, configure
from rebalancer.settings import Settings


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("rebalancer.engine", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_a_json_line_has_time_level_logger_message_and_the_workflow_when_known() -> None:
    line = json.loads(JsonFormatter().format(record(
        "workflow %s %s: %s -> %s", "0a1b2c3d", "buy", "created", "submitting",
        workflow_id="0a1b2c3d-0000-4000-8000-000000000000", task="buy")))
    assert line.pop("time").endswith("+00:00")
    assert line == {"level": "INFO", "logger": "rebalancer.engine",
                    "message": "workflow 0a1b2c3d buy: created -> submitting",
                    "workflow_id": "0a1b2c3d-0000-4000-8000-000000000000", "task": "buy"}
    # Nothing known, nothing made up; a line break in a message stays inside one line.
    plain = JsonFormatter().format(record("two\nlines"))
    assert "\n" not in plain and set(json.loads(plain)) == {"time", "level", "logger", "message"}


def test_an_exception_is_one_field_of_the_same_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("rebalancer", logging.ERROR, __file__, 1, "failed", (),
                                   sys.exc_info())
    line = json.loads(JsonFormatter().format(failed))
    assert line["level"] == "ERROR" and "ValueError: boom" in line["exception"]


def test_the_environment_chooses_the_format(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REBALANCER_LOG_FORMAT", "json")
    assert Settings().log_format == "json"
    monkeypatch.setenv("REBALANCER_LOG_FORMAT", "")
    assert Settings().log_format == "text"
    monkeypatch.setenv("REBALANCER_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="log_format"):
        Settings()
    root = logging.getLogger()
    kept = root.handlers[:], root.level
    try:
        configure("json")
        logging.getLogger("rebalancer.api").info("command %s", "pause",
                                                 extra={"workflow_id": "w", "task": None})
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert line["message"] == "command pause" and line["workflow_id"] == "w"
        assert "task" not in line
        configure("text")
        logging.getLogger("rebalancer.api").info("command %s", "resume")
        assert capsys.readouterr().err.strip().endswith("INFO rebalancer.api: command resume")
    finally:
        root.handlers[:], level = kept
        root.setLevel(level)
