"""Workflow spec models and the typed, resolved task configs that processors receive."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from rebalancer.exchanges.base import OrderType, Side, Wallet
from rebalancer.machines import TaskKind
from rebalancer.money import to_money

# Task names end up in NATS subjects (`rebalancer.events.<id>.<task>.<state>`) and in
# `TaskStateChanged.task_name`, so they are plain lower-case identifiers: no dots, no spaces, and
# never the reserved `_workflow` (which starts with an underscore).
NAME_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]*")
SPEC_NAME_PATTERN: Final = re.compile(r"[a-z][a-z0-9_-]*")
CURRENCY_PATTERN: Final = re.compile(r"[A-Z0-9]{1,20}")

DUPLICATE_TASK_NAME: Final = "duplicate_task_name"

ParamType = Literal["account", "currency", "amount", "string", "int"]

# What a trade does when its orders filled less than `min_filled_fraction` of the plan.
PartialPolicy = Literal["continue", "fail", "needs_attention"]
# Unless the spec says otherwise, an operator decides: carrying on with a fraction of the
# amount moves the wrong amount down the whole path, failing strands what was bought.
DEFAULT_ON_PARTIAL: Final[PartialPolicy] = "needs_attention"
# Filled at or above this fraction of the plan counts as filled. Below 1 because a full fill is
# rarely exact: a market buy by quote amount is floored to the amount step (the exchange keeps
# the dust), a base amount to the lot size; 1% is far above that dust and far below one lost
# TWAP slice (one of up to 100).
DEFAULT_MIN_FILLED_FRACTION: Final = Decimal("0.99")


class _Unknown:
    """Stands for a config value only known at run time (it holds a template)."""

    _instance: ClassVar[_Unknown | None] = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()


Money = Annotated[Decimal, BeforeValidator(to_money)]
Currency = Annotated[str, StringConstraints(pattern=CURRENCY_PATTERN.pattern)]
AccountId = Annotated[str, StringConstraints(min_length=1, pattern=r"^\S+$")]
Network = Annotated[str, StringConstraints(min_length=1, pattern=r"^\S+$")]

_FROZEN: Final = ConfigDict(frozen=True, extra="forbid")


# --- spec models --------------------------------------------------------------------------------


class ParamSpec(BaseModel):
    """A workflow parameter: its type decides how `resolve_params` reads and checks it."""

    model_config = _FROZEN

    type: ParamType
    description: str = ""


class TwapSpec(BaseModel):
    """Split a trade into `slices` equal orders, `interval_seconds` apart (done at run time)."""

    model_config = _FROZEN

    slices: int = Field(ge=1)
    interval_seconds: float = Field(ge=0)


def _json_safe(value: Any, where: str) -> Any:
    """Config as plain JSON data, so a spec survives model_dump(mode="json") unchanged."""
    if isinstance(value, Decimal):
        return str(value)  # the typed config reads it back as a Decimal
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, not {key!r}")
            out[key] = _json_safe(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_json_safe(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, str | int | float):  # floats are refused per field
        return value
    raise ValueError(f"{where}: {type(value).__name__} is not a config value")


class TaskSpec(BaseModel):
    """One step of a workflow. `config` holds literals and templates, checked by validation."""

    model_config = _FROZEN

    name: str
    kind: TaskKind
    config: dict[str, Any] = Field(default_factory=dict)
    twap: TwapSpec | None = None  # trade only; the trade processor does the slicing
    deadline_seconds: float | None = Field(default=None, gt=0)
    # Trade only, like twap: what a fill below min_filled_fraction of the plan leads to
    # (None: DEFAULT_ON_PARTIAL, DEFAULT_MIN_FILLED_FRACTION).
    on_partial: PartialPolicy | None = None
    min_filled_fraction: Decimal | None = Field(default=None, gt=0, le=1)

    @field_validator("name", mode="before")
    @classmethod
    def _lower_case_name(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _snake_name(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(
                f"task name {value!r} must be a snake_case identifier (letters, digits, _)"
            )
        return value

    @field_validator("config", mode="before")
    @classmethod
    def _plain_config(cls, value: object) -> object:
        return _json_safe(value, "config") if isinstance(value, Mapping) else value

    @model_validator(mode="after")
    def _twap_only_on_trades(self) -> TaskSpec:
        for key in ("twap", "on_partial", "min_filled_fraction"):
            if getattr(self, key) is not None and self.kind is not TaskKind.TRADE:
                raise ValueError(f"{key} is only for trade tasks, not {self.kind.value}")
        return self


def duplicate_name_problems(names: Iterable[str | None]) -> list[str]:
    """One line per task whose (lower-case) name an earlier task already has; None is skipped."""
    first: dict[str, int] = {}
    problems = []
    for position, name in enumerate(names, 1):
        if name is None:
            continue
        if name in first:
            problems.append(
                f"task {name!r} (#{position}): duplicate task name (task #{first[name]} has it)"
            )
        else:
            first[name] = position
    return problems


class WorkflowSpec(BaseModel):
    """A named, ordered list of tasks with declared parameters and a result template.

    Static checks of its references live in `rebalancer.specs.validation`; the model itself
    only guarantees well-formed names, unique task names and twap on trades only.
    """

    model_config = _FROZEN

    name: str
    description: str = ""
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    tasks: list[TaskSpec] = Field(min_length=1)
    result: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _spec_name(cls, value: str) -> str:
        if not SPEC_NAME_PATTERN.fullmatch(value):
            raise ValueError(f"spec name {value!r} must be lower-case letters, digits, _ or -")
        return value

    @field_validator("params", "result")
    @classmethod
    def _identifier_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not NAME_PATTERN.fullmatch(key):
                raise ValueError(f"{key!r} must be a lower-case snake_case identifier")
        return value

    @model_validator(mode="after")
    def _unique_task_names(self) -> WorkflowSpec:
        if problems := duplicate_name_problems(task.name for task in self.tasks):
            # its own error type, so that loading can leave it to the line-by-line checks
            raise PydanticCustomError(
                DUPLICATE_TASK_NAME, "{problems}", {"problems": "; ".join(problems)}
            )
        return self

    def task_index(self, name: str) -> int:
        """The position of the task called `name` (any case); raises KeyError."""
        wanted = name.lower()
        for index, task in enumerate(self.tasks):
            if task.name == wanted:
                return index
        raise KeyError(name)


# --- typed task configs -------------------------------------------------------------------------


class TaskConfig(BaseModel):
    """Base of the resolved configs: frozen, no unknown keys, money as Decimal.

    `rule_problems` holds the rules between fields; it also runs on partly known values during
    static validation, where a templated value is `UNKNOWN`.
    """

    model_config = _FROZEN

    # Fields that name one of our accounts; checked against Accounts when they are literals.
    account_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def rule_problems(cls, values: Mapping[str, Any]) -> list[str]:
        return []

    @model_validator(mode="after")
    def _rules_hold(self) -> TaskConfig:
        if problems := self.rule_problems(dict(self)):
            raise ValueError("; ".join(problems))
        return self


def _known(*values: Any) -> bool:
    return all(value is not UNKNOWN for value in values)


def _differ(values: Mapping[str, Any], first: str, second: str) -> list[str]:
    a, b = values.get(first), values.get(second)
    if _known(a, b) and a is not None and a == b:
        return [f"{first} and {second} are both {a!r}"]
    return []


class TradeConfig(TaskConfig):
    """One order (or a TWAP of them): `amount` in base, or `quote_amount` to spend/receive."""

    account_fields: ClassVar[frozenset[str]] = frozenset({"account"})

    account: AccountId
    side: Side
    order_type: OrderType = OrderType.MARKET
    base_currency: Currency
    quote_currency: Currency
    amount: Money | None = None
    quote_amount: Money | None = None
    price: Money | None = None  # limit orders only

    @classmethod
    def rule_problems(cls, values: Mapping[str, Any]) -> list[str]:
        problems = _differ(values, "base_currency", "quote_currency")
        given = [key for key in ("amount", "quote_amount") if values.get(key) is not None]
        if len(given) != 1:
            problems.append(f"give exactly one of amount, quote_amount (given: {given or 'none'})")
        order_type, price = values.get("order_type", OrderType.MARKET), values.get("price")
        if order_type is not UNKNOWN:
            if order_type == OrderType.LIMIT and price is None:
                problems.append("a limit order needs a price")
            if order_type != OrderType.LIMIT and price is not None:
                problems.append("price is only for limit orders")
        return problems


class WithdrawConfig(TaskConfig):
    """Send `amount` of `currency` on `network` to `to_account`'s deposit address."""

    account_fields: ClassVar[frozenset[str]] = frozenset({"from_account", "to_account"})

    from_account: AccountId
    to_account: AccountId
    currency: Currency
    amount: Money
    network: Network
    tag: str | None = None

    @classmethod
    def rule_problems(cls, values: Mapping[str, Any]) -> list[str]:
        return _differ(values, "from_account", "to_account")


class DepositConfig(TaskConfig):
    """Await an arrival on `account`, matched by txid or else by amount."""

    account_fields: ClassVar[frozenset[str]] = frozenset({"account", "from_account"})

    account: AccountId
    currency: Currency
    txid: str | None = None
    amount: Money | None = None
    from_account: AccountId | None = None

    @classmethod
    def rule_problems(cls, values: Mapping[str, Any]) -> list[str]:
        problems = _differ(values, "account", "from_account")
        if values.get("txid") is None and values.get("amount") is None:
            problems.append("a deposit needs a txid or an amount to recognise it")
        return problems


class TransferConfig(TaskConfig):
    """Move `amount` between the spot and futures wallets of one account."""

    account_fields: ClassVar[frozenset[str]] = frozenset({"account"})

    account: AccountId
    currency: Currency
    amount: Money
    from_wallet: Wallet
    to_wallet: Wallet

    @classmethod
    def rule_problems(cls, values: Mapping[str, Any]) -> list[str]:
        return _differ(values, "from_wallet", "to_wallet")


class MasterTransferConfig(TaskConfig):
    """Move `amount` between a master and its sub accounts, with the master's credentials."""

    account_fields: ClassVar[frozenset[str]] = frozenset(
        {"master_account", "from_account", "to_account"}
    )

    master_account: AccountId
    from_account: AccountId
    to_account: AccountId
    currency: Currency
    amount: Money
    from_wallet: Wallet = Wallet.SPOT
    to_wallet: Wallet = Wallet.SPOT

    @classmethod
    def rule_problems(cls, values: Mapping[str, Any]) -> list[str]:
        return _differ(values, "from_account", "to_account")


AnyTaskConfig = (
    TradeConfig | WithdrawConfig | DepositConfig | TransferConfig | MasterTransferConfig
)

CONFIG_MODELS: Final[Mapping[TaskKind, type[TaskConfig]]] = MappingProxyType(
    {
        TaskKind.TRADE: TradeConfig,
        TaskKind.WITHDRAW: WithdrawConfig,
        TaskKind.DEPOSIT: DepositConfig,
        TaskKind.TRANSFER: TransferConfig,
        TaskKind.MASTER_TRANSFER: MasterTransferConfig,
    }
)

__all__ = [
    "CONFIG_MODELS",
    "CURRENCY_PATTERN",
    "DEFAULT_MIN_FILLED_FRACTION",
    "DEFAULT_ON_PARTIAL",
    "DUPLICATE_TASK_NAME",
    "NAME_PATTERN",
    "UNKNOWN",
    "AnyTaskConfig",
    "DepositConfig",
    "MasterTransferConfig",
    "Money",
    "ParamSpec",
    "ParamType",
    "PartialPolicy",
    "TaskConfig",
    "TaskSpec",
    "TradeConfig",
    "TransferConfig",
    "TwapSpec",
    "WithdrawConfig",
    "WorkflowSpec",
    "duplicate_name_problems",
    "to_money",
]
