"""Templates in task configs: `{param}`, `{param.attr}`, `{$.task.path}`; `{{`/`}}` escape braces.

A string that is exactly one template renders to the referenced value itself (the typed config
then coerces it, e.g. a recorded "0.41" to Decimal); a template inside a longer string is
formatted into it. Dicts and lists are walked; other values pass through unchanged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal

from rebalancer.accounts import Account
from rebalancer.errors import SpecError

ParamValue = Account | Decimal | int | str
# What `resolve_params` returns: param name -> Account (for account params), str, Decimal or int.
ResolvedParams = Mapping[str, ParamValue]
# Lower-case task name -> {"request_params": ..., "request_result": ..., "refresh_result": ...}.
Results = Mapping[str, Mapping[str, Any]]

ACCOUNT_ATTRIBUTES: Final = frozenset(Account.model_fields)

_TOKEN: Final = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_PARAM: Final = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?")
_RESULT: Final = re.compile(r"\$\.([A-Za-z][A-Za-z0-9_]*)((?:\.[A-Za-z0-9_]+)*)")


@dataclass(frozen=True, slots=True)
class Reference:
    """One template: `{name}` (param), `{name.attr}` (attr) or `{$.name.path}` (result).

    For a result reference `name` is the task name in lower case and `path` the dotted path
    below it (e.g. "refresh_result.result.txid"); `text` is the template as written.
    """

    kind: Literal["param", "attr", "result"]
    name: str
    text: str
    attr: str | None = None
    path: str | None = None


def _reference(body: str, text: str) -> Reference:
    if body.startswith("$"):
        match = _RESULT.fullmatch(body)
        if match is None:
            raise SpecError(f"{text}: bad result reference; write {{$.task_name.dotted.path}}")
        if not match.group(2):
            example = f"{{$.{match.group(1)}.request_result.id}}"
            raise SpecError(f"{text}: name a recorded field, e.g. {example}")
        return Reference("result", match.group(1).lower(), text, path=match.group(2)[1:])
    match = _PARAM.fullmatch(body)
    if match is None:
        raise SpecError(
            f"{text}: bad template; write {{param}}, {{param.attr}} or {{$.task.path}}"
            " (and {{{{ or }}}} for a literal brace)"
        )
    name, attr = match.groups()
    if attr is None:
        return Reference("param", name, text)
    return Reference("attr", name, text, attr=attr)


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> tuple[str | Reference, ...]:
    """The string as literal runs and references, in order; raises SpecError if malformed."""
    parts: list[str | Reference] = []
    literal: list[str] = []
    end = 0
    for match in _TOKEN.finditer(text):
        literal.append(text[end : match.start()])
        end = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
        elif token in ("{", "}"):
            raise SpecError(
                f"{text!r}: unmatched {token!r} at position {match.start()};"
                f" write {token * 2} for a literal brace"
            )
        else:
            if joined := "".join(literal):
                parts.append(joined)
            literal = []
            parts.append(_reference(match.group(1), token))
    literal.append(text[end:])
    if joined := "".join(literal):
        parts.append(joined)
    return tuple(parts)


def references(value: Any) -> list[Reference]:
    """Every template in `value` (a string, or dicts/lists of them), in order.

    Raises SpecError for a malformed template or an unmatched brace.
    """
    if isinstance(value, str):
        return [part for part in _parse(value) if isinstance(part, Reference)]
    if isinstance(value, Mapping):
        return [ref for item in value.values() for ref in references(item)]
    if isinstance(value, list | tuple):
        return [ref for item in value for ref in references(item)]
    return []


def has_templates(value: Any) -> bool:
    """Whether rendering `value` would look anything up (escapes alone do not count)."""
    return bool(references(value))


def render(value: Any, params: ResolvedParams, results: Results) -> Any:
    """`value` with every template replaced; raises SpecError naming a reference it cannot fill.

    An account param renders as its id; `{account.interim_account}` and `{account.master_account}`
    as the linked account's id. A recorded null renders as None when it is the whole string.
    """
    if isinstance(value, str):
        parts = _parse(value)
        if len(parts) == 1 and isinstance(parts[0], Reference):
            return _lookup(parts[0], params, results)
        return "".join(
            part if isinstance(part, str) else _text(part, _lookup(part, params, results))
            for part in parts
        )
    if isinstance(value, Mapping):
        return {key: render(item, params, results) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [render(item, params, results) for item in value]
    return value


def _lookup(ref: Reference, params: ResolvedParams, results: Results) -> Any:
    if ref.kind == "result":
        return _recorded(ref, results)
    if ref.name not in params:
        raise SpecError(f"{ref.text}: no param {ref.name!r} was given")
    value = params[ref.name]
    if ref.kind == "param":
        return value.id if isinstance(value, Account) else value
    if not isinstance(value, Account):
        raise SpecError(f"{ref.text}: param {ref.name!r} is not an account, it has no attributes")
    if ref.attr not in ACCOUNT_ATTRIBUTES:
        known = ", ".join(sorted(ACCOUNT_ATTRIBUTES))
        raise SpecError(f"{ref.text}: accounts have no attribute {ref.attr!r} (they have: {known})")
    found = value.model_dump(mode="json")[ref.attr]
    if found is None:
        raise SpecError(f"{ref.text}: account {value.id!r} has no {ref.attr} configured")
    return found


def _recorded(ref: Reference, results: Results) -> Any:
    recorded = results.get(ref.name)
    if recorded is None:
        raise SpecError(f"{ref.text}: task {ref.name!r} has recorded nothing yet")
    node: Any = recorded
    assert ref.path is not None  # every result reference has one, see _reference
    for step in ref.path.split("."):
        if isinstance(node, Mapping) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            raise SpecError(f"{ref.text}: task {ref.name!r} has not recorded {ref.path}")
    return node


def _text(ref: Reference, value: Any) -> str:
    """A value as it reads inside a longer string."""
    if isinstance(value, Account):
        return value.id
    if isinstance(value, Decimal):
        return format(value, "f")  # "1000000", never "1E+6"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    what = "nothing (null)" if value is None else f"a {type(value).__name__}"
    raise SpecError(f"{ref.text}: is {what}, which cannot be written into a string")


__all__ = [
    "ACCOUNT_ATTRIBUTES",
    "ParamValue",
    "Reference",
    "ResolvedParams",
    "Results",
    "has_templates",
    "references",
    "render",
]
