"""Specs written in Python: the same models and the same validation as YAML specs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from rebalancer.accounts import Accounts
from rebalancer.machines import TaskKind
from rebalancer.specs.loading import spec_from_data
from rebalancer.specs.models import (
    ParamSpec,
    ParamType,
    PartialPolicy,
    TaskSpec,
    TwapSpec,
    WorkflowSpec,
)
from rebalancer.specs.validation import InvalidSpecError, validation_error_lines


def task(
    name: str,
    kind: TaskKind | str,
    *,
    twap: TwapSpec | Mapping[str, Any] | None = None,
    deadline_seconds: float | None = None,
    on_partial: PartialPolicy | None = None,
    min_filled_fraction: Decimal | str | None = None,
    **config: Any,
) -> TaskSpec:
    """One task; `config` holds literals and templates (`"{param}"`, `"{$.task.path}"`).

    Raises InvalidSpecError for a bad name, kind or twap; references are checked by `workflow`.
    """
    return _task(
        {
            "name": name,
            "kind": kind,
            "config": config,
            "twap": twap,
            "deadline_seconds": deadline_seconds,
            "on_partial": on_partial,
            "min_filled_fraction": min_filled_fraction,
        }
    )


def twap_trade(
    name: str,
    *,
    slices: int,
    interval_seconds: float,
    deadline_seconds: float | None = None,
    on_partial: PartialPolicy | None = None,
    min_filled_fraction: Decimal | str | None = None,
    **config: Any,
) -> TaskSpec:
    """A trade task split into `slices` orders `interval_seconds` apart by the trade processor;
    `on_partial` decides what a fill below `min_filled_fraction` of the plan leads to."""
    return task(
        name,
        TaskKind.TRADE,
        twap={"slices": slices, "interval_seconds": interval_seconds},
        deadline_seconds=deadline_seconds,
        on_partial=on_partial,
        min_filled_fraction=min_filled_fraction,
        **config,
    )


def workflow(
    name: str,
    params: Mapping[str, ParamSpec | ParamType],
    tasks: Sequence[TaskSpec],
    result: Mapping[str, str] | None = None,
    description: str = "",
    *,
    accounts: Accounts | None = None,
) -> WorkflowSpec:
    """A validated spec; params may be given by type alone (`{"from_account": "account"}`).

    Raises InvalidSpecError listing every problem, exactly as for a YAML file.
    """
    return spec_from_data(
        {
            "name": name,
            "description": description,
            "params": {
                key: value.model_dump() if isinstance(value, ParamSpec) else {"type": value}
                for key, value in params.items()
            },
            "tasks": [t.model_dump() for t in tasks],
            "result": dict(result or {}),
        },
        accounts,
    )


def _task(data: dict[str, Any]) -> TaskSpec:
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as e:
        subject = f"task {data['name']!r}"
        raise InvalidSpecError(subject, validation_error_lines(e, subject=subject)) from e


__all__ = ["task", "twap_trade", "workflow"]
