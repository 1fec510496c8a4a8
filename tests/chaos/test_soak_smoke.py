"""The soak's code path (tests/soak) with small knobs, so CI runs it: 3 workflows, 5 SIGKILLs of
`serve`, then every check the full `make soak` makes, and its report as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.soak.report import problems, text
from tests.soak.soak import Knobs, soak
from tests.support import NatsServer


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_the_soak_with_small_knobs_finds_nothing(database_url: str, tmp_path: Path) -> None:
    # A JetStream server of its own: the copy must hold this database's events only.
    with NatsServer.jetstream(tmp_path / "js") as nats:
        knobs = Knobs(workflows=3, kills=5, time_scale=200, budget=90)
        report = await soak(knobs, database_url, nats.url, tmp_path / "chain.key", tmp_path)
    print(text(report))
    assert problems(report) == [], text(report)
    assert report["kills"] == 5 and report["serve_incarnations"] == 6
    assert report["workflows_started"] == 3
    assert sum(report["outcomes"]["states"].values()) == 3
    assert report["operations"]["duplicates"] == [] and report["operations"]["operations"] > 0
    assert report["events"]["lost"] == 0 and report["events"]["table"] > 0
    assert report["events"]["copy"] == report["events"]["table"]
    assert report["sim_check"]["ok"] and report["audit"]["ok"]
    assert "checked against the JetStream copy" in report["audit"]["output"]["jetstream"]
    json.dumps(report)  # what run.py writes to the file
