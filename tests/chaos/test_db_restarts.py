"""PostgreSQL crashed and restarted twice under one `serve` driving fifteen workflows: all end
done, the ledger and the streams check out, and `serve` was never restarted by hand."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from events.migrations import migrate
from events.store import EventStore
from rebalancer.commands import start_workflow
from rebalancer.specs.loading import builtin_specs
from tests.support import (
    MONEY_MOVES,
    SEED_PARAMS,
    SEED_SPEC,
    intents,
    load,
    operations,
    write_world,
)
from tests.support.cluster import Cluster
from tests.support.worker import Worker as InProcess

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = 15


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path / "pg")
    made.start()
    try:
        yield made
    finally:
        made.destroy()


def environment(url: str, world: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    env.update(REBALANCER_DATABASE_URL=url, REBALANCER_SIM_WORLD=str(world),
               REBALANCER_SIM_TIME_SCALE="40", PYTHONUNBUFFERED="1")
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rebalancer", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def start_serve(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "rebalancer", "serve"], env=env,
                                cwd=ROOT, stdout=out, stderr=out)


async def states(url: str, ids: list[str]) -> Counter[str] | None:
    """The workflows' states, None while the database is away."""
    try:
        async with await EventStore.open(url, max_size=1, connect_timeout=2) as store:
            return Counter([(await load(store, w)).state for w in ids])
    except Exception:
        return None


async def test_serve_rides_out_two_postgresql_crashes(cluster: Cluster, tmp_path: Path) -> None:
    url = cluster.url
    await migrate(url)
    world = write_world(tmp_path, balances={"upbit-personal": {"KRW": "100000000"}})
    spec = builtin_specs()[SEED_SPEC]
    async with InProcess(url, world=world) as seeding:  # seeds the world's tables
        ids = [(await start_workflow(seeding.store, spec,
                                     {**SEED_PARAMS, "from_amount": str(200_000 + 1000 * i)},
                                     seeding.accounts))[0] for i in range(WORKFLOWS)]
    env = environment(url, world)
    log = tmp_path / "serve.log"
    serve = start_serve(env, log)
    try:
        for _ in range(2):
            await asyncio.sleep(3)
            cluster.crash()  # pg_ctl stop -m immediate: every backend killed
            await asyncio.sleep(2)  # away for a while, not just a blip
            cluster.start()
            assert serve.poll() is None, log.read_text()[-3000:]
        deadline = time.monotonic() + 180
        while True:
            found = await states(url, ids)
            if found is not None and set(found) <= {"done", "failed", "needs_attention"}:
                break
            assert serve.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, (found, log.read_text()[-3000:])
            await asyncio.sleep(0.5)
        assert found == {"done": WORKFLOWS}, found
        assert serve.poll() is None, "serve ended on its own"
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=30)
    assert code == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "database unavailable" in text or "PostgreSQL unavailable" in text  # it was noticed
    # Nothing executed twice, nothing without an intent.
    client_ids = Counter(i["client_id"] for i in await intents(url))
    assert all(n == 1 for n in client_ids.values()), client_ids.most_common(3)
    executed = Counter(op["audit_ref"] for op in await operations(url, *MONEY_MOVES))
    assert all(n == 1 for n in executed.values()), executed.most_common(3)
    assert set(executed) <= set(client_ids)
    # The ledger, the streams and the read models all check out.
    for args in (("sim", "check"), ("audit",), ("replay", "--verify")):
        done = cli(env, *args)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
