"""HTML building blocks: every value goes through `e` (escaped), the layout, the badges.

No template engine: the pages are few and small, and one escaping function that every
interpolation calls is easier to audit than autoescape rules.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from rebalancer.cli.format import json_default, key_fields, when

STATIC_VERSION = "4"  # bumped with the static files, so a browser does not keep an old script


def e(value: object) -> str:
    """Text for HTML, quotes included (it may land in an attribute)."""
    return html.escape("" if value is None else str(value), quote=True)


def badge(state: object) -> str:
    text = str(state or "-")
    return f'<span class="state s-{e(text)}">{e(text)}</span>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, css: str = "",
          numeric: frozenset[int] = frozenset(), empty: str = "none") -> str:
    """A table of already-escaped cells (the callers escape each with `e`)."""
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{e(h)}</th>'
                   for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{cell}</td>'
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="empty">{e(empty)}</td></tr>'
    return f'<table class="{e(css)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def fields(payload: dict[str, Any] | None) -> str:
    """A task's request or result: its JSON, folded away behind its first few keys."""
    if not payload:
        return '<span class="muted">-</span>'
    text = json.dumps(payload, indent=2, sort_keys=True, default=json_default)
    # The fields `status` prints (amount, currency, txid...), else the first few keys.
    summary = key_fields(payload) or ", ".join(
        f"{k}={_scalar(v)}" for k, v in list(payload.items())[:3])
    return f"<details><summary>{e(summary)}</summary><pre>{e(text)}</pre></details>"


def _scalar(value: Any) -> str:
    if isinstance(value, dict):
        return "{…}"
    if isinstance(value, list):
        return f"[{len(value)}]"
    text = str(value)
    return text if len(text) <= 24 else text[:23] + "…"


def at(value: datetime | str | None) -> str:
    return f'<time>{e(when(value))}</time>'


def age(since: datetime | None, now: datetime | None = None) -> str:
    if since is None:
        return "-"
    seconds = int(((now or datetime.now(UTC)) - since).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


NAV = (("/", "Workflows"), ("/attention", "Needs attention"), ("/exposure", "Money"))


def layout(title: str, body: str, *, path: str, operator: bool, attention: int | None = None
           ) -> str:
    """The page around `body`. `operator`: a token is configured, so the token box shows (the
    token itself is typed by the operator and kept in the tab's sessionStorage, never sent
    down in a page)."""
    links = []
    for href, label in NAV:
        current = ' aria-current="page"' if href == path else ""
        count = (f' <span class="count">{attention}</span>'
                 if href == "/attention" and attention else "")
        links.append(f'<a href="{e(href)}"{current}>{e(label)}{count}</a>')
    mode = ('<form id="token-box" class="token" autocomplete="off">'
            '<input type="password" id="operator-token" placeholder="operator token"'
            ' aria-label="operator token" autocomplete="off">'
            '<button type="submit">use</button>'
            '<button type="button" id="forget-token" hidden>forget</button></form>'
            if operator else '<span class="readonly" title="no operator token is configured">'
            'read-only</span>')
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} · rebalancer</title>"
        f'<link rel="stylesheet" href="/static/dashboard.css?v={STATIC_VERSION}">'
        f'<script defer src="/static/dashboard.js?v={STATIC_VERSION}"></script>'
        f'</head><body data-operator="{"yes" if operator else "no"}">'
        '<header><span class="brand">rebalancer</span>'
        f'<nav id="nav" data-live>{"".join(links)}</nav>'
        '<span id="live" class="live off" title="live updates">live</span>'
        f"{mode}</header>"
        f'<main><div id="reply" role="status" hidden></div>{body}</main></body></html>'
    )
