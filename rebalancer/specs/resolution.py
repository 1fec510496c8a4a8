"""Resolution: typed params from what a user gave, and task configs and results at run time."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Any, cast

from pydantic import ValidationError

from rebalancer.accounts import Account, Accounts
from rebalancer.errors import SpecError
from rebalancer.specs.interpolation import ParamValue, ResolvedParams, Results, references, render
from rebalancer.specs.models import (
    CONFIG_MODELS,
    CURRENCY_PATTERN,
    AnyTaskConfig,
    WorkflowSpec,
    to_money,
)
from rebalancer.specs.validation import InvalidSpecError, message_text, spec_problems, task_label

# --- params -------------------------------------------------------------------------------------

_INT = re.compile(r"-?[0-9]{1,18}", re.ASCII)


def resolve_params(
    spec: WorkflowSpec, raw: Mapping[str, str | Decimal | int], accounts: Accounts
) -> ResolvedParams:
    """Typed, immutable params for `spec`; raises InvalidSpecError listing every problem.

    Every declared param must be given and nothing else. Accounts must exist (-> Account),
    currencies are upper-case letters/digits, amounts positive decimals (never floats), ints
    whole numbers. Config values made of params alone are then checked as at run time, and
    `{param.attr}` must be configured for the given account.
    """
    problems = [f"param {name!r}: missing" for name in spec.params if name not in raw]
    declared = ", ".join(spec.params) or "none"
    problems += [
        f"param {name!r}: unknown (declared: {declared})" for name in raw if name not in spec.params
    ]
    resolved: dict[str, ParamValue] = {}
    for name, param in spec.params.items():
        if name in raw:
            try:
                resolved[name] = _param_value(param.type, raw[name], accounts)
            except (SpecError, ValueError) as e:
                problems.append(f"param {name!r}: {e}")
    subject = f"params for spec {spec.name!r}"
    if problems:
        raise InvalidSpecError(subject, problems)
    values = MappingProxyType(resolved)
    if problems := spec_problems(spec, accounts, values):
        raise InvalidSpecError(subject, problems)
    return values


def _param_value(kind: str, raw: object, accounts: Accounts) -> ParamValue:
    if kind == "amount":
        return to_money(raw)
    if kind == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and _INT.fullmatch(raw):
            return int(raw)
        raise ValueError(f"expected a whole number, got {raw!r}")
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {type(raw).__name__} {raw!r}")
    if kind == "account":
        return accounts.get(raw)
    if kind == "currency" and not CURRENCY_PATTERN.fullmatch(raw):
        raise ValueError(f"a currency is upper-case letters and digits, e.g. 'ETH', not {raw!r}")
    return raw


def dump_params(params: ResolvedParams) -> dict[str, str | int]:
    """Params as JSON data (account ids, decimal strings) for the WorkflowCreated event."""
    out: dict[str, str | int] = {}
    for name, value in params.items():
        if isinstance(value, Account):
            out[name] = value.id
        elif isinstance(value, Decimal):
            out[name] = str(value)
        else:
            out[name] = value
    return out


# --- run time -----------------------------------------------------------------------------------


def resolve_config(
    spec: WorkflowSpec, index: int, params: ResolvedParams, results: Results
) -> AnyTaskConfig:
    """Task `index`'s config with templates filled in, as its kind's typed model.

    `results` maps lower-case task names to what they recorded. Raises SpecError naming the
    task and the reference or field when a value is missing or has the wrong type.
    """
    try:
        task = spec.tasks[index]
    except IndexError:
        raise SpecError(f"spec {spec.name!r} has no task #{index}") from None
    label = task_label(index, task.name)
    try:
        rendered = render(task.config, params, results)
    except SpecError as e:
        raise SpecError(f"{label}: {e}") from e
    try:
        return cast(AnyTaskConfig, CONFIG_MODELS[task.kind].model_validate(rendered))
    except ValidationError as e:
        lines = []
        for item in e.errors():
            key = str(item["loc"][0]) if item["loc"] else ""
            source = task.config.get(key)
            shown = f" ({source!r} is {rendered[key]!r})" if references(source) else ""
            field = f"{key}: " if key else ""
            lines.append(f"{field}{message_text(item['msg'])}{shown}")
        raise SpecError(f"{label}: " + "; ".join(lines)) from e


def resolve_result(spec: WorkflowSpec, params: ResolvedParams, results: Results) -> dict[str, Any]:
    """The workflow's `result` templates filled in; raises SpecError naming the entry."""
    out = {}
    for key, template in spec.result.items():
        try:
            out[key] = render(template, params, results)
        except SpecError as e:
            raise SpecError(f"result {key!r}: {e}") from e
    return out


__all__ = ["dump_params", "resolve_config", "resolve_params", "resolve_result"]
