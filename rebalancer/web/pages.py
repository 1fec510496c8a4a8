"""The pages' bodies, from what the read models (and the store, for a timeline) hold.

Elements with `data-live` and an id are swapped in place by the page's script when the read
models move (see static/dashboard.js); everything else stays as the operator left it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from events.store import RecordedEvent
from events.vocabulary import WorkflowState
from projections.workflows import TaskView, WorkflowRow, WorkflowView
from rebalancer.balances import Holding, Unreadable
from rebalancer.cli.format import error_text, money
from rebalancer.cli.money import amount_text, rate_text
from rebalancer.cli.reports import event_row
from rebalancer.machines import workflow_machine
from rebalancer.web.render import age, at, badge, e, fields, table

# The workflow commands the page offers, in this order, where the state allows them.
CONTROLS = ("pause", "resume", "cancel")


def workflows_page(rows: Sequence[WorkflowRow], *, state: str | None, spec: str | None,
                   specs: Sequence[str], now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    states = "".join(
        f'<option value="{e(s)}"{" selected" if s == state else ""}>{e(s)}</option>'
        for s in WorkflowState)
    spec_options = "".join(
        f'<option value="{e(s)}"{" selected" if s == spec else ""}>{e(s)}</option>'
        for s in specs)
    filters = (
        '<form class="filters" method="get" action="/">'
        f'<label>state <select name="state"><option value="">any</option>{states}</select>'
        f'</label> <label>spec <select name="spec"><option value="">any</option>{spec_options}'
        '</select></label> <button type="submit">filter</button></form>')
    body = table(
        ("workflow", "spec", "state", "amount", "age", "current task", "updated"),
        ((f'<a href="/workflows/{e(r.workflow_id)}">{e(r.workflow_id[:8])}</a>',
          e(r.spec_name), badge(r.state),
          e(f"{amount_text(r.from_amount)} {r.from_currency or ''}".strip()),
          e(age(r.created_at, now)), _current(r), at(r.updated_at)) for r in rows),
        css="workflows", numeric=frozenset({3}), empty="no workflows")
    return (f"<h1>Workflows</h1>{filters}"
            f'<section id="workflows" data-live>{body}</section>')


def _current(row: WorkflowRow) -> str:
    if row.current_task is None:
        return '<span class="muted">-</span>'
    return (f"{e(row.current_task)} {e(row.current_task_name)} "
            f"{badge(row.current_task_state)}")


def workflow_page(view: WorkflowView, events: Sequence[RecordedEvent], note: str | None, *,
                  operator: bool) -> str:
    head = (
        f'<h1>Workflow <code>{e(view.workflow_id)}</code></h1>'
        '<section id="summary" data-live><dl class="facts">'
        f"<dt>spec</dt><dd>{e(view.spec_name)}</dd>"
        f"<dt>state</dt><dd>{badge(view.state)} {e(view.reason or '')}</dd>"
        "<dt>params</dt><dd>" + " ".join(
            f"<code>{e(k)}={e(v)}</code>" for k, v in view.params.items()) + "</dd>"
        f"<dt>version</dt><dd>{e(view.version)}, created {at(view.created_at)},"
        f" updated {at(view.updated_at)}</dd>"
        + (f'<dt>note</dt><dd class="warn">{e(note)}</dd>' if note else "")
        + (f'<dt>error</dt><dd class="warn">{e(view.error.get("task", "?"))}:'
           f' {e(error_text(view.error))}</dd>' if view.error else "")
        + "</dl>"
        + (controls(view.workflow_id, view.state) if operator else "")
        + "</section>")
    path = '<section id="path" data-live><h2>Path</h2><ol class="path">' + "".join(
        f'<li class="step s-{e(t.state)}" title="{e(t.kind)}: {e(t.state)}">'
        f'<span class="idx">{e(t.index)}</span> <b>{e(t.name)}</b>'
        f'<span class="kind">{e(t.kind)}</span>{badge(t.state)}</li>'
        for t in view.tasks) + "</ol></section>"
    tasks = '<section id="tasks" data-live><h2>Tasks</h2>' + table(
        ("#", "task", "kind", "state", "updated", "request", "request result",
         "refresh result", "error"),
        ((e(t.index), e(t.name), e(t.kind), badge(t.state), at(t.updated_at),
          fields(t.request_params), fields(t.request_result), fields(t.refresh_result),
          e(error_text(t.error))) for t in view.tasks),
        css="tasks") + "".join(attention(view.workflow_id, t, operator=operator)
                               for t in view.tasks) + "</section>"
    timeline = f'<section id="timeline" data-live><h2>Timeline ({len(events)} events)</h2>' + table(
        ("recorded at", "v", "task", "trigger", "move", "details"),
        ([e(cell) for cell in event_row(event)] for event in events), css="timeline")
    return head + path + tasks + money_section(view) + timeline + "</section>"


def money_section(view: WorkflowView) -> str:
    """The spec's result, the effective rate, fees, remainders and fills (as `status ID`)."""
    parts = ['<section id="money" data-live><h2>Result</h2>']
    parts.append(table(("result", "value"), ((e(k), e("-" if v is None else amount_text(v)))
                                              for k, v in view.result.items()),
                       css="result", numeric=frozenset({1}), empty="no result yet"))
    if view.rate is not None:
        r = view.rate
        parts.append(
            f'<p class="rate">rate {e(rate_text(r["rate"]))} {e(r["to_currency"])} per'
            f' {e(r["from_currency"])} ({e(rate_text(r["inverse"]))} {e(r["from_currency"])}'
            f' per {e(r["to_currency"])}): {e(amount_text(r["to_amount"]))}'
            f' {e(r["to_currency"])} for {e(amount_text(r["from_amount"]))}'
            f' {e(r["from_currency"])} spent</p>')
    parts.append("<h3>Fees</h3>" + table(
        ("currency", "amount"), ((e(c), e(amount_text(a))) for c, a in view.fees.items()),
        css="fees", numeric=frozenset({1}), empty="no fees recorded"))
    parts.append("<h3>Left behind</h3>" + table(
        ("account", "currency", "amount", "reason", "task"),
        ((e(r["account"]), e(r["currency"]), e(amount_text(r["amount"])), e(r["reason"]),
          e(r["task"])) for r in view.remainders),
        css="remainders", numeric=frozenset({2}), empty="nothing left behind"))
    if view.fills:
        parts.append("<h3>Fills</h3>" + table(
            ("task", "account", "side", "market", "filled", "cost", "average price", "slices",
             "fees"),
            ((e(f["task"]), e(f["account"]), e(f["side"]),
              e(f"{f['base_currency']}/{f['quote_currency']}"), e(amount_text(f["filled"])),
              e(amount_text(f["cost"])), e(amount_text(f["average_price"])),
              e("-" if f["slices"] is None else f["slices"]),
              e(", ".join(f"{amount_text(v)} {k}" for k, v in f["fees"].items()) or "-"))
             for f in view.fills), css="fills", numeric=frozenset({4, 5, 6, 7})))
    return "".join(parts) + "</section>"


# -- the operator's part ---------------------------------------------------------------------


def action_form(kind: str, label: str, hidden: dict[str, Any], *, note: bool = False,
                css: str = "") -> str:
    """A POST to /actions/KIND. Its command id is made here, once per page rendered: a form
    sent twice (a double click, a resend) is the same command, applied once."""
    inputs = "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">'
                     for k, v in {"command_id": f"web-{uuid.uuid4()}", **hidden}.items()
                     if v is not None)
    text = (f'<input name="{"note" if kind == "resolve" else "reason"}"'
            f' placeholder="{"note (required)" if kind == "resolve" else "reason"}"'
            f'{" required" if kind == "resolve" else ""} autocomplete="off">'
            if note else "")
    return (f'<form class="action {e(css)}" method="post" action="/actions/{e(kind)}"'
            f' data-action>{inputs}{text}'
            '<input type="password" name="token" class="form-token" placeholder="token"'
            ' autocomplete="off">'
            f'<button type="submit" class="act-{e(kind)}">{e(label)}</button></form>')


def controls(workflow_id: str, state: str) -> str:
    allowed = set(workflow_machine().allowed(state))
    forms = [action_form(kind, kind, {"workflow_id": workflow_id}, note=True)
             for kind in CONTROLS if kind in allowed]
    return (f'<div class="controls"><span class="label">workflow:</span>{"".join(forms)}</div>'
            if forms else "")


def attention(workflow_id: str, task: TaskView, *, operator: bool) -> str:
    """A task in needs_attention: why, the candidates, the commands that would settle it, and
    (with a token) the buttons that send those same commands."""
    if task.state != "needs_attention":
        return ""
    error = task.error or {}
    candidates = error.get("candidates") or []
    rows = []
    for c in candidates:
        claimed = c.get("claimed_by_workflow")
        cell = (f'claimed by <a href="/workflows/{e(claimed)}">{e(str(claimed)[:8])}</a>'
                if claimed else "unclaimed")
        if operator and not claimed:
            result = {"result_id": c.get("id"), "result_txid": c.get("txid") or None}
            cell += action_form("resolve", "this one is ours: done", {
                "workflow_id": workflow_id, "task": task.name, "outcome": "done", **result},
                note=True)
        rows.append((e(c.get("id")), e(c.get("txid")), e(c.get("amount")), e(c.get("at")),
                     cell))
    parts = [f'<div class="attention" id="attention-{e(task.name)}">'
             f"<h3>{e(task.name)} needs attention</h3>"
             f'<p class="warn">{e(error_text(error))}</p>']
    if candidates:
        parts.append(table(("id", "txid", "amount", "at", "claimed"), rows, css="candidates"))
    # The task's own commands (tasks/remedies.py: every escalation records them); one recorded
    # before they were is settled by the general ones.
    commands = error.get("commands") or [
        f"rebalancer resolve {workflow_id} {task.name} --outcome {outcome} --note '{note}'"
        for outcome, note in (("resend", "checked: it never reached the exchange"),
                              ("done", "checked: it happened"),
                              ("failed", "checked: nothing was sent"))]
    if commands:
        parts.append("<p>settle with one of:</p><ul class=commands>" + "".join(
            f"<li><code>{e(c)}</code></li>" for c in commands) + "</ul>")
    if operator:
        parts.append('<div class="controls"><span class="label">resolve it here:</span>' + "".join(
            action_form("resolve", label, {"workflow_id": workflow_id, "task": task.name,
                                           "outcome": outcome}, note=True)
            for outcome, label in (("resend", "resend"), ("failed", "nothing was sent: failed"))
        ) + "</div>")
    return "".join(parts) + "</div>"


def attention_page(views: Sequence[WorkflowView], *, operator: bool) -> str:
    items = []
    for view in views:
        waiting = "".join(attention(view.workflow_id, t, operator=operator) for t in view.tasks)
        items.append(
            f'<article class="queue-item"><h2><a href="/workflows/{e(view.workflow_id)}">'
            f"{e(view.workflow_id[:8])}</a> {e(view.spec_name)} {badge(view.state)}</h2>"
            f'<p class="muted">{e(view.reason or "")}</p>'
            + (controls(view.workflow_id, view.state) if operator else "")
            + (waiting or '<p class="muted">no task waits (an operator paused it, or the'
               " worker escalated the workflow itself)</p>") + "</article>")
    body = "".join(items) or '<p class="empty">nothing needs attention</p>'
    return f'<h1>Needs attention</h1><section id="queue" data-live>{body}</section>'


# -- money -----------------------------------------------------------------------------------


def exposure_page(found: dict[str, Any], holdings: Sequence[Holding],
                  unreadable: Sequence[Unreadable], read_at: datetime | None) -> str:
    """`found` as `exposure --json` prints it (rebalancer.cli.format.jsonable of
    read_exposure): the same strings, so the page and the command line cannot disagree."""
    transit = table(
        ("to account", "currency", "amount", "from", "workflow", "task", "status", "since"),
        ((e(i["account"]), e(i["currency"]), e(i["amount"]), e(i["from_account"] or "-"),
          f'<a href="/workflows/{e(i["workflow_id"])}">{e(i["workflow_id"][:8])}</a>',
          e(i["task"] or f"#{i['task_index']}"), badge(i["status"]), at(i["since"]))
         for i in found["in_transit"]),
        css="in-transit", numeric=frozenset({2}), empty="nothing in transit")
    totals = table(
        ("account", "currency", "amount", "items", "oldest"),
        ((e(t["account"]), e(t["currency"]), e(t["amount"]), e(t["items"]), at(t["oldest"]))
         for t in found["totals"]),
        css="transit-totals", numeric=frozenset({2, 3}), empty="nothing in transit")
    left = table(
        ("account", "currency", "amount", "reason", "workflow", "task", "updated"),
        ((e(r["account"]), e(r["currency"]), e(r["amount"]), e(r["reason"]),
          f'<a href="/workflows/{e(r["workflow_id"])}">{e(r["workflow_id"][:8])}</a>',
          e(r["task"]), at(r["updated_at"])) for r in found["remainders"]),
        css="remainders", numeric=frozenset({2}), empty="nothing left behind")
    left_totals = table(
        ("account", "currency", "amount", "items"),
        ((e(t["account"]), e(t["currency"]), e(t["amount"]), e(t["items"]))
         for t in found["remainder_totals"]),
        css="remainder-totals", numeric=frozenset({2, 3}), empty="nothing left behind")
    balances = table(
        ("account", "exchange", "wallet", "currency", "free", "total"),
        ((e(h.account), e(h.exchange), e(h.wallet.value), e(h.currency), e(money(h.free)),
          e(money(h.total))) for h in holdings),
        css="balances", numeric=frozenset({4, 5}), empty="no balances read")
    failed = "".join(f'<p class="warn">{e(u.account)} ({e(u.exchange)}): {e(u.error)}</p>'
                     for u in unreadable)
    return (
        '<h1>Money</h1><section id="exposure" data-live>'
        '<h2>In transit <a class="small" href="/exposure.json">json</a></h2>'
        f"{transit}<h3>Totals per account and currency</h3>{totals}"
        f"<h2>Left behind</h2>{left}<h3>Totals</h3>{left_totals}</section>"
        f'<section id="balances"><h2>Balances per account</h2>'
        f'<p class="muted">read from the exchanges at {at(read_at)}; reload for fresh figures'
        f"</p>{failed}{balances}</section>")


def message_page(title: str, text: str) -> str:
    return f'<h1>{e(title)}</h1><p>{e(text)}</p><p><a href="/">workflows</a></p>'
