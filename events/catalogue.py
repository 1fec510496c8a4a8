"""Event models, their registry by stored type name, and upcasting of old schema versions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from events.errors import DuplicateRegistrationError, InvalidEventError, UnknownEventTypeError
from events.vocabulary import (
    ERROR_CLEARING_TRIGGERS,
    TaskKind,
    TaskState,
    TaskTrigger,
    WorkflowState,
    WorkflowTrigger,
)

JsonObject = dict[str, Any]
Upcaster = Callable[[JsonObject], JsonObject]
E = TypeVar("E", bound="Event")


class Event(BaseModel):
    """Base of every stored event: frozen, strict, no unknown fields.

    Subclasses set `type_name` (the stored `type` column) and `schema_version` (the newest
    shape; older stored shapes are upcast on read).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    type_name: ClassVar[str]
    schema_version: ClassVar[int] = 1


class Catalogue:
    """Registry of event classes by type name, with upcasters from older schema versions."""

    def __init__(self) -> None:
        self._types: dict[str, type[Event]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, cls: type[E]) -> type[E]:
        """Class decorator; raises DuplicateRegistrationError on a second use of a type name."""
        name = cls.__dict__.get("type_name")
        if not isinstance(name, str) or not name:
            raise InvalidEventError(f"{cls.__name__} must define a non-empty type_name")
        if name in self._types:
            raise DuplicateRegistrationError(f"event type {name!r} is already registered")
        self._types[name] = cls
        return cls

    def upcaster(self, type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator for a function turning `from_version` data into `from_version + 1` data."""

        def decorate(fn: Upcaster) -> Upcaster:
            key = (type_name, from_version)
            if key in self._upcasters:
                raise DuplicateRegistrationError(
                    f"upcaster {type_name} v{from_version} is already registered"
                )
            self._upcasters[key] = fn
            return fn

        return decorate

    @property
    def type_names(self) -> frozenset[str]:
        return frozenset(self._types)

    def model(self, type_name: str) -> type[Event]:
        """The class registered under `type_name`; raises UnknownEventTypeError."""
        try:
            return self._types[type_name]
        except KeyError:
            raise UnknownEventTypeError(f"unknown event type {type_name!r}") from None

    def validate(self, type_name: str, data: Mapping[str, Any]) -> Event:
        """Build the newest-shape event from plain data; raises InvalidEventError."""
        cls = self.model(type_name)
        try:
            # Python-mode strict validation would refuse the JSON forms (e.g. Decimal as
            # str) that stored data legitimately has, so validate as JSON-compatible input.
            return cls.model_validate(dict(data), strict=False)
        except ValidationError as e:
            raise InvalidEventError(f"{type_name}: {_one_line(e)}") from e

    def upcast(self, type_name: str, schema_version: int, data: JsonObject) -> JsonObject:
        """Apply upcasters until `data` has the registered class's schema version."""
        target = self.model(type_name).schema_version
        if schema_version > target:
            raise UnknownEventTypeError(
                f"{type_name} schema_version {schema_version} is newer than this code's "
                f"{target}; upgrade before reading it"
            )
        version = schema_version
        while version < target:
            try:
                step = self._upcasters[(type_name, version)]
            except KeyError:
                raise UnknownEventTypeError(
                    f"no upcaster for {type_name} from schema_version {version}"
                ) from None
            data = step(data)
            version += 1
        return data

    def decode(self, type_name: str, schema_version: int, data: JsonObject) -> Event:
        """Stored row -> newest-shape event."""
        return self.validate(type_name, self.upcast(type_name, schema_version, data))

    @staticmethod
    def encode(event: Event) -> JsonObject:
        """Event -> JSON-safe data (Decimal as strings, never floats)."""
        return event.model_dump(mode="json")


def _one_line(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(root)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


catalogue = Catalogue()

# The vocabulary's members, taken from their stored values too: strict models would refuse a plain
# "submit", though it is exactly the stored form; a value outside the vocabulary is still refused.
Kind = Annotated[TaskKind, Field(strict=False)]
TaskStateName = Annotated[TaskState, Field(strict=False)]
TaskTriggerName = Annotated[TaskTrigger, Field(strict=False)]
WorkflowStateName = Annotated[WorkflowState, Field(strict=False)]
WorkflowTriggerName = Annotated[WorkflowTrigger, Field(strict=False)]


@catalogue.register
class WorkflowCreated(Event):
    """A workflow was started from a spec snapshot with its parameters."""

    type_name: ClassVar[str] = "WorkflowCreated"

    spec_name: str
    spec: JsonObject
    params: JsonObject
    command_id: str


@catalogue.register
class WorkflowStateChanged(Event):
    """The workflow machine moved from `source` to `dest` by `trigger`."""

    type_name: ClassVar[str] = "WorkflowStateChanged"

    trigger: WorkflowTriggerName
    source: WorkflowStateName
    dest: WorkflowStateName
    reason: str | None = None


class TaskFields(Protocol):
    """What every fold of a task keeps: its state, what the exchange reported, its last error."""

    state: TaskState
    request_params: JsonObject | None
    request_result: JsonObject | None
    refresh_result: JsonObject | None
    error: JsonObject | None


@catalogue.register
class TaskStateChanged(Event):
    """A task's machine moved, carrying what the move learned from the exchange."""

    type_name: ClassVar[str] = "TaskStateChanged"

    task_index: int
    task_name: str
    kind: Kind
    trigger: TaskTriggerName
    source: TaskStateName
    dest: TaskStateName
    request_params: JsonObject | None = None
    request_result: JsonObject | None = None
    refresh_result: JsonObject | None = None
    error: JsonObject | None = None

    @field_validator("task_name")
    @classmethod
    def _lower_case(cls, value: str) -> str:
        if value != value.lower():
            raise ValueError("task_name must be lower-case")
        return value

    @field_validator("task_index")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("task_index must be >= 0")
        return value

    def merge_into(self, task: TaskFields) -> None:
        """Apply this move's carried facts to `task`: the one merge every fold of a task uses.

        A result the move does not carry keeps its earlier value; the last error stays until a
        move carries a new one or sends the task back to be sent afresh (reset, resolve_resend).
        """
        task.state = self.dest
        if self.request_params is not None:
            task.request_params = self.request_params
        if self.request_result is not None:
            task.request_result = self.request_result
        if self.refresh_result is not None:
            task.refresh_result = self.refresh_result
        if self.error is not None:
            task.error = self.error
        elif self.trigger in ERROR_CLEARING_TRIGGERS:
            task.error = None
