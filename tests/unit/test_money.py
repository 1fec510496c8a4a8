"""The one money parser: every refused form named in issue 11, and the forms it accepts."""

from decimal import Decimal

import pytest
from pydantic import BaseModel, ValidationError

from rebalancer.money import to_money
from rebalancer.specs.models import Money


class _Holder(BaseModel):
    amount: Money


REFUSED = [
    "1e999", "1e30", "1" + "0" * 150, "1_000", "+100", " 100 ", "100 ", "\u0661\u0660\u0660",
    "NaN", "nan", "Infinity", "-Infinity", "-1", "0", "0.0", "1,000", "", "0x10", "1.", ".5",
    "1e-999", "1." + "1" * 40, 1.5, 0.1, True, False, None, [], {}, 10**30, -5, 0,
    Decimal("NaN"), Decimal("Infinity"), Decimal("1e30"), Decimal("-1"),
]


@pytest.mark.parametrize("value", REFUSED, ids=repr)
def test_refused_forms_name_the_field(value: object) -> None:
    with pytest.raises(ValueError):
        to_money(value)
    with pytest.raises(ValidationError) as caught:
        _Holder.model_validate({"amount": value})
    assert caught.value.errors()[0]["loc"] == ("amount",)


@pytest.mark.parametrize(("value", "expected"), [
    ("100", Decimal("100")), ("0.00000001", Decimal("0.00000001")),
    ("1000000.5", Decimal("1000000.5")), (Decimal("1.5"), Decimal("1.5")), (5, Decimal(5)),
    ("1E-8", Decimal("0.00000001")),  # how str(Decimal) writes it back
], ids=repr)
def test_accepted_forms(value: object, expected: Decimal) -> None:
    assert to_money(value) == expected
    assert _Holder.model_validate({"amount": value}).amount == expected
