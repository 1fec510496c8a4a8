"""Alert sinks besides NATS: webhooks configured under `alerts.webhooks` in the YAML.

A webhook URL carries its token (Slack's does), so it is a secret: the configuration names an
environment variable (`url_env`) or a file (`url_file`, mode 600) that holds it, never the URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rebalancer.accounts import DEFAULT_CONFIG, load_config_file, validation_text
from rebalancer.errors import SpecError
from rebalancer.secret_files import read_secret_file
from rebalancer.settings import environment_variable

# Every kind raised (projections/alerts.py, rebalancer/alerts.py); a kind missing here could
# never reach a webhook, `all` included.
AlertKind = Literal["workflow_failed", "task_stuck", "needs_attention", "relay_lag",
                    "partial_fill"]
ALERT_KINDS: tuple[str, ...] = get_args(AlertKind)
# Keys that would put the URL itself into the file.
_INLINE = ("url", "webhook_url", "uri", "endpoint", "token")
# What `url_env` may hold: a variable's name. Anything else is likely the URL pasted in its
# place, which a later "is not set" would print.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class WebhookSink(BaseModel):
    """One webhook: which alert kinds go to it, in which body, and how hard to try."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    kinds: Literal["all"] | list[AlertKind] = "all"
    format: Literal["json", "slack"] = "json"
    url_env: str | None = None
    url_file: Path | None = None
    # One attempt's limit, all of it (connect, send, answer).
    timeout_seconds: float = Field(default=5.0, gt=0, le=60, allow_inf_nan=False)
    # Attempts per alert before it is given up (logged, counted, kept in the outbox).
    max_attempts: int = Field(default=10, ge=1, le=1000)
    # The wait after the first failure; it doubles with every failure, up to 10 minutes.
    backoff_seconds: float = Field(default=2.0, gt=0, le=600, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_url(cls, data: object) -> object:
        if isinstance(data, dict):
            inline = [k for k in _INLINE if k in data]
            if inline:
                raise ValueError(
                    f"{', '.join(inline)}: a webhook URL carries its token and is never written"
                    " in the configuration; name where to read it with url_env (an environment"
                    " variable) or url_file (a file, mode 600)")
        return data

    @field_validator("url_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        # The message never quotes the value: it may be the URL with its token.
        if value is not None and not ENV_NAME.fullmatch(value):
            raise ValueError("must be the name of an environment variable ([A-Za-z_]"
                             "[A-Za-z0-9_]*) that holds the URL, never the URL itself")
        return value

    @field_validator("url_file", mode="before")
    @classmethod
    def _file_not_url(cls, value: object) -> object:
        # Before the Path conversion, which would fold `https://` into `https:/`.
        if isinstance(value, str) and "://" in value:
            raise ValueError("must be the path of a file (mode 600) that holds the URL,"
                             " never the URL itself")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> WebhookSink:
        if (self.url_env is None) == (self.url_file is None):
            raise ValueError("give exactly one of url_env and url_file")
        return self

    def taken(self) -> tuple[str, ...]:
        """The alert kinds this sink takes."""
        return ALERT_KINDS if self.kinds == "all" else tuple(self.kinds)


@dataclass(frozen=True)
class WebhookTarget:
    """A sink with its URL read; the URL never shows in a repr (nor, so, in a log)."""

    sink: WebhookSink
    url: str = field(repr=False)

    @property
    def name(self) -> str:
        return self.sink.name


def load_webhooks(path: Path | None = None) -> list[WebhookSink]:
    """The configuration's `alerts.webhooks`; raises SpecError naming the file and the key,
    never a value."""
    where = f"configuration {path or DEFAULT_CONFIG}"
    section = load_config_file(path).get("alerts") or {}
    if not isinstance(section, dict):
        raise SpecError(f"{where}: alerts: must be a mapping (webhooks: [...])")
    unknown = sorted(str(k) for k in section if k != "webhooks")
    if unknown:
        raise SpecError(f"{where}: alerts.{unknown[0]}: unknown key (known: webhooks)")
    listed = section.get("webhooks") or []
    if not isinstance(listed, list):
        raise SpecError(f"{where}: alerts.webhooks: must be a list of webhooks")
    sinks: list[WebhookSink] = []
    for index, item in enumerate(listed):
        try:
            sink = WebhookSink.model_validate(item)
        except ValidationError as e:
            raise SpecError(f"{where}: alerts.webhooks.{index}: {validation_text(e)}") from None
        if any(s.name == sink.name for s in sinks):
            raise SpecError(f"{where}: alerts.webhooks.{index}: name {sink.name!r} is used twice")
        sinks.append(sink)
    return sinks


def webhook_targets(path: Path | None = None) -> list[WebhookTarget]:
    """Every configured webhook with its URL read from its env variable or file; raises
    SpecError naming the source, never the value."""
    base = (path or DEFAULT_CONFIG).resolve().parent
    return [WebhookTarget(sink, _read_url(sink, base)) for sink in load_webhooks(path)]


def _read_url(sink: WebhookSink, base: Path) -> str:
    what = f"alerts.webhooks {sink.name}"
    if sink.url_env is not None:
        value = (environment_variable(sink.url_env) or "").strip()
        source = f"url_env {sink.url_env}"
        if not value:
            raise SpecError(f"{what}: {source} is not set")
    else:
        assert sink.url_file is not None
        path = sink.url_file if sink.url_file.is_absolute() else base / sink.url_file
        source = f"url_file {path}"
        value = read_secret_file(path, "url_file", where=f"{what}: ")
        if not value:
            raise SpecError(f"{what}: {source} is empty")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SpecError(f"{what}: {source} does not hold an http(s) URL")
    return value
