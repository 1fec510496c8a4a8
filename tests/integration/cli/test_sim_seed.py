"""`sim seed` as an operator runs it: the same world file `serve` uses, and a reset refused while
workflows live on the simulated exchanges (unless --force). Real PostgreSQL, the command line
in a subprocess."""

from __future__ import annotations

from pathlib import Path

from events.store import EventStore
from rebalancer.commands import control_workflow
from rebalancer.exchanges.simulated import DEFAULT_WORLD
from tests.integration.cli.test_habits import cli, started


def environment(database_url: str, owner_database_url: str, home: Path) -> dict[str, str]:
    return {"REBALANCER_DATABASE_URL": database_url,
            "REBALANCER_MIGRATE_DATABASE_URL": owner_database_url,
            "REBALANCER_HOME": str(home)}


async def test_sim_seed_uses_the_world_serve_uses(
    database_url: str, owner_database_url: str, tmp_path: Path
) -> None:
    world = tmp_path / "my-world.yaml"
    world.write_text(DEFAULT_WORLD.read_text(encoding="utf-8"), encoding="utf-8")
    env = {**environment(database_url, owner_database_url, tmp_path / "home"),
           "REBALANCER_SIM_WORLD": str(world)}
    code, out, err = await cli(env, "sim", "seed")
    assert code == 0, err
    assert out.splitlines()[0] == f"seeded from {world}"
    code, out, err = await cli(env, "sim", "seed", "--reset")
    assert code == 0, err
    assert out.splitlines()[0] == f"reset and seeded from {world}"
    # --world still wins over the variable.
    code, out, err = await cli(env, "sim", "seed", "--reset", "--world", str(DEFAULT_WORLD))
    assert code == 0, err
    assert out.splitlines()[0] == f"reset and seeded from {DEFAULT_WORLD}"


async def test_a_reset_under_active_workflows_is_refused_unless_forced(
    store: EventStore, database_url: str, owner_database_url: str, tmp_path: Path
) -> None:
    env = environment(database_url, owner_database_url, tmp_path / "home")
    code, _, err = await cli(env, "sim", "seed")
    assert code == 0, err
    first = await started(store, "seed-reset-1")
    await started(store, "seed-reset-2")
    code, out, err = await cli(env, "sim", "seed", "--reset")
    assert code == 3 and out == ""
    assert err.count("\n") == 1, err
    assert "2 workflow(s) are active" in err and "would vanish" in err and "--force" in err
    # One ended: one left, said so.
    await control_workflow(store, "cancel", "seed-reset-cancel", first, "done with it")
    code, _, err = await cli(env, "sim", "seed", "--reset")
    assert code == 3 and "1 workflow(s) are active" in err, err
    code, out, err = await cli(env, "sim", "seed", "--reset", "--force")
    assert code == 0, err
    assert out.startswith("reset and seeded from ")
