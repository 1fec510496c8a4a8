"""Static checks of a spec before any workflow starts: every reference, account and kind."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from rebalancer.accounts import Accounts
from rebalancer.errors import SpecError
from rebalancer.machines import TaskKind
from rebalancer.specs.interpolation import (
    ACCOUNT_ATTRIBUTES,
    Reference,
    ResolvedParams,
    references,
    render,
)
from rebalancer.specs.models import (
    CONFIG_MODELS,
    UNKNOWN,
    TaskConfig,
    WorkflowSpec,
    duplicate_name_problems,
)
from rebalancer.specs.recorded import RECORDED_FIELDS


class InvalidSpecError(SpecError):
    """A spec (or the params for it) has problems; `problems` holds one line per problem."""

    def __init__(self, subject: str, problems: Sequence[str]) -> None:
        self.subject = subject
        self.problems = tuple(problems)
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__("\n".join([f"{subject}: {count}", *(f"  {p}" for p in self.problems)]))


@dataclass(frozen=True, slots=True)
class TaskDraft:
    """A task as far as it could be read: kind None when unknown, config None when unreadable."""

    name: str | None
    kind: TaskKind | None
    config: Mapping[str, Any] | None


def task_label(position: int, name: str | None, repeated: bool = False) -> str:
    """How problems name a task: by name, with its position when the name is not unique."""
    if not name:
        return f"task #{position + 1}"
    return f"task {name!r} (#{position + 1})" if repeated else f"task {name!r}"


def _repeated(names: Sequence[str | None]) -> set[str]:
    counts = Counter(name for name in names if name)
    return {name for name, count in counts.items() if count > 1}


# --- static checks ------------------------------------------------------------------------------


def spec_problems(
    spec: WorkflowSpec,
    accounts: Accounts | None = None,
    values: ResolvedParams | None = None,
) -> list[str]:
    """Every problem in `spec`, one line each naming the task (or result) and the reference.

    With `accounts`, literal account ids must exist. With `values` (resolved params), config
    values made only of params are rendered and type-checked too, as at the start of a workflow.
    """
    return draft_problems(
        {name: param.type for name, param in spec.params.items()},
        [TaskDraft(task.name, task.kind, task.config) for task in spec.tasks],
        spec.result,
        accounts=accounts,
        values=values,
    )


def validate_spec(spec: WorkflowSpec, accounts: Accounts | None = None) -> None:
    """Raise InvalidSpecError listing every problem in `spec` (see `spec_problems`)."""
    if problems := spec_problems(spec, accounts):
        raise InvalidSpecError(f"spec {spec.name!r}", problems)


def draft_problems(
    params: Mapping[str, str | None],
    tasks: Sequence[TaskDraft],
    result: Mapping[str, Any],
    *,
    accounts: Accounts | None = None,
    values: ResolvedParams | None = None,
) -> list[str]:
    """The checks behind `spec_problems`, on tasks that may have parsed only partly.

    `params` maps each declared param to its type (None when its declaration is unreadable).
    """
    checker = _Checker(params, tasks, accounts, values)
    problems = duplicate_name_problems(task.name for task in tasks)
    for position, task in enumerate(tasks):
        problems += checker.task(position, task)
    for key, template in result.items():
        problems += checker.templates(f"result {key!r}", None, template)
    return list(dict.fromkeys(problems))  # one line per problem, first occurrence kept


class _Checker:
    def __init__(
        self,
        params: Mapping[str, str | None],
        tasks: Sequence[TaskDraft],
        accounts: Accounts | None,
        values: ResolvedParams | None,
    ) -> None:
        self.params = params
        self.tasks = tasks
        self.accounts = accounts
        self.values = values
        self.repeated = _repeated([task.name for task in tasks])
        self.positions: dict[str, int] = {}
        for position, task in enumerate(tasks):
            if task.name:
                self.positions.setdefault(task.name, position)

    def task(self, position: int, task: TaskDraft) -> list[str]:
        label = task_label(position, task.name, task.name in self.repeated)
        if task.config is None:
            return []
        problems = []
        for key, value in task.config.items():
            problems += self.templates(f"{label}: {key}", position, value)
        if task.kind is not None:
            problems += self.fields(label, task.kind, task.config)
        return problems

    def templates(self, where: str, position: int | None, value: Any) -> list[str]:
        """Problems with the references in `value`; `position` None may use every task."""
        try:
            refs = references(value)
        except SpecError as e:
            return [f"{where}: {e}"]
        return [f"{where}: {p}" for ref in refs if (p := self.reference(ref, position))]

    def reference(self, ref: Reference, position: int | None) -> str | None:
        if ref.kind != "result":
            declared = ", ".join(sorted(self.params)) or "none"
            if ref.name not in self.params:
                return f"{ref.text}: unknown param {ref.name!r} (declared: {declared})"
            if ref.kind == "attr":
                kind = self.params[ref.name]
                if kind is not None and kind != "account":
                    return (
                        f"{ref.text}: param {ref.name!r} is of type {kind}; only account params"
                        " have attributes"
                    )
                if ref.attr not in ACCOUNT_ATTRIBUTES:
                    known = ", ".join(sorted(ACCOUNT_ATTRIBUTES))
                    return f"{ref.text}: accounts have no attribute {ref.attr!r} ({known})"
            return None
        target = self.positions.get(ref.name)
        if target is None:
            known = ", ".join(self.positions) or "none"
            return f"{ref.text}: unknown task {ref.name!r} (tasks: {known})"
        if position is not None and target == position:
            return f"{ref.text}: a task cannot use its own results"
        if position is not None and target > position:
            return (
                f"{ref.text}: task {ref.name!r} (#{target + 1}) comes later; a task may only use"
                " the results of earlier tasks"
            )
        kind = self.tasks[target].kind
        assert ref.path is not None
        if kind is not None and ref.path not in RECORDED_FIELDS[kind]:
            head = ref.path.rsplit(".", 1)[0] + "."
            near = sorted(p.removeprefix(head) for p in RECORDED_FIELDS[kind] if p.startswith(head))
            hint = f" ({head[:-1]} has: {', '.join(near)})" if near else ""
            return f"{ref.text}: a {kind.value} task never records {ref.path!r}{hint}"
        return None

    def fields(self, label: str, kind: TaskKind, config: Mapping[str, Any]) -> list[str]:
        """Unknown and missing keys, literal values of the wrong type, rules between fields."""
        model = CONFIG_MODELS[kind]
        fields = model.model_fields
        problems = []
        for key in config:
            if key not in fields:
                known = ", ".join(fields)
                problems.append(
                    f"{label}: unknown config key {key!r} for a {kind.value} task (keys: {known})"
                )
        for key, field in fields.items():
            if field.is_required() and key not in config:
                problems.append(f"{label}: missing config key {key!r}")
        known_values: dict[str, Any] = {
            key: field.get_default(call_default_factory=True)
            for key, field in fields.items()
            if not field.is_required()
        }
        for key, raw in config.items():
            if key not in fields:
                continue
            value, problem = self.value(model, key, raw)
            if problem is not None:
                problems.append(f"{label}: {key}: {problem}")
            known_values[key] = value  # UNKNOWN when it failed: the rules skip what is unknown
        problems += [f"{label}: {rule}" for rule in model.rule_problems(known_values)]
        if self.accounts is not None:
            for key in sorted(model.account_fields):
                account = config.get(key)
                if isinstance(account, str) and _literal(account) and account not in (
                    self.accounts
                ):
                    problems.append(f"{label}: {key}: unknown account {account!r}")
        return problems

    def value(self, model: type[TaskConfig], key: str, raw: Any) -> tuple[Any, str | None]:
        """The typed value of one field, UNKNOWN until run time, and any problem with it."""
        try:
            refs = references(raw)
        except SpecError:
            return UNKNOWN, None  # already reported by `templates`
        shown = ""
        if not refs:
            raw = render(raw, {}, {})  # only unescapes {{ and }}
        else:
            if self.values is None or any(ref.kind == "result" for ref in refs):
                return UNKNOWN, None
            if any(self.reference(ref, None) for ref in refs):
                return UNKNOWN, None  # already reported
            try:
                rendered = render(raw, self.values, {})
            except SpecError as e:
                return UNKNOWN, str(e)
            shown = f" ({raw!r} is {rendered!r})"
            raw = rendered
        try:
            return _field_adapter(model, key).validate_python(raw), None
        except ValidationError as e:
            return UNKNOWN, _error_text(e) + shown + _unquoted_hint(raw)


def _literal(value: str) -> bool:
    """Whether `value` holds no template; a malformed one is not a literal (`templates` reports
    it) and must not stop the other checks."""
    try:
        return not references(value)
    except SpecError:
        return False


@functools.cache
def _field_adapter(model: type[TaskConfig], key: str) -> TypeAdapter[Any]:
    return TypeAdapter(model.model_fields[key].rebuild_annotation())


def _error_text(error: ValidationError) -> str:
    return "; ".join(message_text(item["msg"]) for item in error.errors())


def message_text(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _unquoted_hint(raw: Any) -> str:
    # YAML reads an unquoted {from_account} as the mapping {"from_account": None}.
    if isinstance(raw, Mapping) and len(raw) == 1 and next(iter(raw.values())) is None:
        return f' (an unquoted template? in YAML write "{{{next(iter(raw))}}}")'
    return ""


def validation_error_lines(
    error: ValidationError,
    tasks: Sequence[Any] | None = None,
    skip: frozenset[str] = frozenset(),
    subject: str = "spec",
) -> list[str]:
    """A pydantic error on spec data as problem lines; errors inside `tasks[i]` name that task,
    others `subject`. Error types in `skip` are left out.
    """
    names = [_raw_name(task) for task in tasks or ()]
    repeated = _repeated(names)
    lines = []
    for item in error.errors():
        if item["type"] in skip:
            continue
        loc = list(item["loc"])
        msg = message_text(item["msg"])
        where = subject
        if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int):
            name = names[loc[1]] if loc[1] < len(names) else None
            where = task_label(loc[1], name, name in repeated)
            loc = loc[2:]
        if item["type"] == "enum" and loc == ["kind"]:
            kinds = ", ".join(kind.value for kind in TaskKind)
            msg = f"unknown kind {item['input']!r} (kinds: {kinds})"
        elif item["type"] == "extra_forbidden":
            msg = "unknown key"
        elif item["type"] == "missing":
            msg = "missing"
        field = ".".join(str(part) for part in loc)
        lines.append(f"{where}: {field}: {msg}" if field else f"{where}: {msg}")
    return lines


def _raw_name(task: object) -> str | None:
    name = task.get("name") if isinstance(task, Mapping) else None
    return name.lower() if isinstance(name, str) else None


__all__ = [
    "InvalidSpecError",
    "TaskDraft",
    "draft_problems",
    "message_text",
    "spec_problems",
    "task_label",
    "validate_spec",
    "validation_error_lines",
]
