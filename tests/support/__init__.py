"""Helpers the tests share: worker processes on the simulated world, waiting, counting, NATS."""

from tests.support.worker import (
    MONEY_MOVES,
    SEED_PARAMS,
    SEED_SPEC,
    Worker,
    event_count,
    intents,
    load,
    money,
    operations,
    withdraw_once,
    write_accounts,
    write_world,
)

__all__ = [
    "MONEY_MOVES",
    "SEED_PARAMS",
    "SEED_SPEC",
    "Worker",
    "event_count",
    "intents",
    "load",
    "money",
    "operations",
    "withdraw_once",
    "write_accounts",
    "write_world",
]
