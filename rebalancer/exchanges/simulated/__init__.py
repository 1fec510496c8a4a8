"""A stateful, deterministic simulated world of several exchanges, kept in schema `sim`."""

# `spec` reads the world file, `faults` injects failures, `ledger` keeps the books and settles
# what came due, `world` owns the database and seeding, `port` is one account's `Exchange`
# (with `orders`, the order rules, and `rows`, database rows as the port's models).

from rebalancer.exchanges.simulated.faults import Faults
from rebalancer.exchanges.simulated.port import SimulatedExchange
from rebalancer.exchanges.simulated.spec import DEFAULT_WORLD, WorldSpec, load_world
from rebalancer.exchanges.simulated.world import SimulatedWorld

__all__ = [
    "DEFAULT_WORLD",
    "Faults",
    "SimulatedExchange",
    "SimulatedWorld",
    "WorldSpec",
    "load_world",
]
