"""Helpers the tests share: worker processes on the simulated world, waiting, counting, NATS."""

from tests.support.counting import event_count
from tests.support.nats_server import NatsServer, free_port
from tests.support.waiting import eventually, eventually_blocking
from tests.support.worker import (
    MONEY_MOVES,
    SEED_PARAMS,
    SEED_SPEC,
    Worker,
    engine_running,
    intents,
    load,
    money,
    operations,
    to_futures,
    withdraw_once,
    write_accounts,
    write_world,
)

__all__ = [
    "MONEY_MOVES",
    "SEED_PARAMS",
    "SEED_SPEC",
    "NatsServer",
    "Worker",
    "engine_running",
    "event_count",
    "eventually",
    "eventually_blocking",
    "free_port",
    "intents",
    "load",
    "money",
    "operations",
    "to_futures",
    "withdraw_once",
    "write_accounts",
    "write_world",
]
