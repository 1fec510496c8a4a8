"""The event catalogue: registration, validation, encoding and upcasting."""

from decimal import Decimal
from typing import Any, ClassVar

import pytest

from events.catalogue import (
    Catalogue,
    Event,
    TaskStateChanged,
    WorkflowCreated,
    WorkflowStateChanged,
    catalogue,
)
from events.errors import DuplicateRegistrationError, InvalidEventError, UnknownEventTypeError


def test_the_three_contract_event_types_are_registered() -> None:
    assert catalogue.type_names == {"WorkflowCreated", "WorkflowStateChanged", "TaskStateChanged"}


def test_registering_a_type_name_twice_raises() -> None:
    local = Catalogue()

    @local.register
    class Once(Event):
        type_name: ClassVar[str] = "Once"

    with pytest.raises(DuplicateRegistrationError):

        @local.register
        class Again(Event):
            type_name: ClassVar[str] = "Once"


def test_an_unknown_type_name_is_refused() -> None:
    with pytest.raises(UnknownEventTypeError, match="NoSuchThing"):
        catalogue.validate("NoSuchThing", {})


def test_data_that_fails_its_model_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidEventError, match="task_name"):
        catalogue.validate(
            "TaskStateChanged",
            {"task_index": 0, "task_name": "Buy", "kind": "trade", "trigger": "submit",
             "source": "created", "dest": "submitting"},
        )
    with pytest.raises(InvalidEventError, match="kind"):
        catalogue.validate(
            "TaskStateChanged",
            {"task_index": 0, "task_name": "buy", "kind": "teleport", "trigger": "submit",
             "source": "created", "dest": "submitting"},
        )
    with pytest.raises(InvalidEventError, match="surprise"):
        catalogue.validate(
            "WorkflowStateChanged",
            {"trigger": "start", "source": "created", "dest": "running", "surprise": 1},
        )


def test_events_are_frozen() -> None:
    event = WorkflowStateChanged(trigger="start", source="created", dest="running")
    with pytest.raises(Exception, match="frozen"):
        event.dest = "done"  # type: ignore[misc]


def test_money_is_encoded_as_strings_never_floats() -> None:
    event = TaskStateChanged(
        task_index=1, task_name="withdraw_x", kind="withdraw", trigger="submit",
        source="created", dest="submitting",
        request_params={"amount": Decimal("1.50000000"), "currency": "ETH"},
    )
    data = catalogue.encode(event)
    assert data["request_params"]["amount"] == "1.50000000"
    assert catalogue.validate("TaskStateChanged", data) == catalogue.validate(
        "TaskStateChanged", data
    )


@pytest.mark.parametrize(
    "event",
    [
        WorkflowCreated(spec_name="s", spec={"tasks": [{"name": "a"}]},
                        params={"from_amount": "1000000"}, command_id="c-1"),
        WorkflowStateChanged(trigger="pause", source="running", dest="paused", reason="ops"),
        TaskStateChanged(task_index=0, task_name="buy", kind="trade", trigger="accept",
                         source="submitting", dest="requested",
                         request_result={"order_id": "1"}, error=None),
    ],
    ids=lambda e: e.type_name,
)
def test_every_event_type_round_trips_through_encode_and_decode(event: Event) -> None:
    data = catalogue.encode(event)
    assert catalogue.decode(event.type_name, event.schema_version, data) == event


def _catalogue_with_v2() -> Catalogue:
    local = Catalogue()

    @local.register
    class AmountNoted(Event):
        type_name: ClassVar[str] = "AmountNoted"
        schema_version: ClassVar[int] = 3
        amount: Decimal
        currency: str
        note: str

    @local.upcaster("AmountNoted", 1)
    def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        # v1 stored "qty" and no currency; KRW was implied.
        return {"amount": data["qty"], "currency": "KRW"}

    @local.upcaster("AmountNoted", 2)
    def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "note": ""}

    return local


def test_an_old_schema_version_is_upcast_step_by_step_to_the_newest() -> None:
    local = _catalogue_with_v2()
    event = local.decode("AmountNoted", 1, {"qty": "5000"})
    assert event.model_dump() == {"amount": Decimal("5000"), "currency": "KRW", "note": ""}
    assert local.decode("AmountNoted", 3, {"amount": "1", "currency": "ETH", "note": "x"})


def test_a_schema_version_newer_than_the_code_is_refused() -> None:
    with pytest.raises(UnknownEventTypeError, match="newer"):
        _catalogue_with_v2().decode("AmountNoted", 4, {})


def test_a_missing_upcaster_is_reported() -> None:
    local = Catalogue()

    @local.register
    class Later(Event):
        type_name: ClassVar[str] = "Later"
        schema_version: ClassVar[int] = 2

    with pytest.raises(UnknownEventTypeError, match="no upcaster"):
        local.decode("Later", 1, {})


def test_an_upcaster_registered_twice_raises() -> None:
    local = _catalogue_with_v2()
    with pytest.raises(DuplicateRegistrationError):
        local.upcaster("AmountNoted", 1)(lambda d: d)
