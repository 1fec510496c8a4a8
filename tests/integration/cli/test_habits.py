"""The command line's habits (issue 13, part 6), as an operator types them: short ids, `watch`
of an unknown or finished workflow, `start --wait --timeout`, `specs show`, a spec file given
to `start`. A real API over real NATS and PostgreSQL; no worker, so nothing moves by itself."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from events.store import EventStore
from projections.runner import ProjectionRunner, default_projections
from rebalancer.accounts import load_accounts
from rebalancer.commands import control_workflow, start_workflow, workflow_id_for
from rebalancer.specs.loading import BUILTIN_DIR, builtin_specs
from tests.support.command_line import api_on_nats, cli

SPEC = "upbit_to_binance_sub_futures"
PARAMS = {"from_account": "upbit-personal", "to_account": "binance-corp-sub",
          "from_currency": "KRW", "interim_currency": "ETH", "to_currency": "USDT",
          "from_amount": "1000000"}


@pytest.fixture
async def env(store: EventStore, database_url: str, nats_url: str,
              tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """The command line's environment, with the API answering on NATS (no worker)."""
    async with api_on_nats(store, database_url, nats_url, tmp_path / "home") as env:
        yield env


def sharing_a_prefix(length: int) -> tuple[str, str]:
    """Two command ids whose workflow ids start with the same `length` hex digits."""
    seen: dict[str, str] = {}
    n = 0
    while True:
        command_id = f"habit-{n}"
        head = workflow_id_for(command_id)[:length]
        if head in seen:
            return seen[head], command_id
        seen[head] = command_id
        n += 1


async def started(store: EventStore, command_id: str) -> str:
    workflow_id, _ = await start_workflow(store, builtin_specs()[SPEC], PARAMS, load_accounts(),
                                          command_id=command_id)
    return workflow_id


def resolved(path: Path) -> Path:
    return path.resolve()


def unique_prefix(workflow_id: str, others: list[str]) -> str:
    return next(workflow_id[:n] for n in range(1, 37)
                if not any(o.startswith(workflow_id[:n]) for o in others if o != workflow_id))


async def test_short_ids_name_a_workflow_in_every_command(
    store: EventStore, env: dict[str, str]
) -> None:
    first, second = sharing_a_prefix(2)
    ids = [await started(store, first), await started(store, second)]
    shared = ids[0][:2]
    # Not projected yet: the prefix is found among the events the read model has not applied.
    short = unique_prefix(ids[0], ids)
    code, out, err = await cli(env, "status", short, "--json")
    assert code == 0, err
    assert json.loads(out)["workflow_id"] == ids[0]
    await ProjectionRunner(store, default_projections()).catch_up()
    # Ambiguous: exit 2, the candidates listed, one a line.
    code, out, err = await cli(env, "history", shared)
    assert code == 2 and out == ""
    assert "ambiguous" in err and ids[0] in err and ids[1] in err
    # Unknown, and not an id at all: exit 2 too.
    absent = next(c for c in "0123456789abcdef" if not any(i.startswith(c) for i in ids))
    code, _, err = await cli(env, "status", absent + "0")
    assert code == 2 and "no workflow id starts with" in err
    code, _, err = await cli(env, "audit", "xyz")
    assert code == 2 and "not a workflow id" in err
    # The 8 digits `status` and `watch` print, in upper case or with a hyphen typed: one id.
    eight = ids[1][:8]
    for spelling in (eight, eight.upper(), ids[1][:11].replace("-", "")):
        code, out, err = await cli(env, "history", spelling, "--json")
        assert code == 0, err
        assert {e["stream_id"] for e in json.loads(out)} == {f"workflow-{ids[1]}"}
    code, out, err = await cli(env, "audit", eight)
    assert code == 0, err
    # The commands that go over NATS send the canonical id the API takes.
    code, out, err = await cli(env, "pause", eight)
    assert code == 3 and "illegal_transition" in err  # created, not running: the API answered
    code, out, err = await cli(env, "cancel", eight, "--reason", "habit test")
    assert code == 0, err
    assert out.strip() == f"{ids[1]}: canceled"
    code, _, err = await cli(env, "resolve", eight, "buy_in_source_spot", "--outcome", "done",
                             "--note", "checked")
    assert code == 3 and ("illegal_transition" in err or "conflict" in err), err


async def test_watch_refuses_an_unknown_id_and_says_when_one_has_finished(
    store: EventStore, env: dict[str, str]
) -> None:
    code, out, err = await cli(env, "watch", str(uuid.uuid4()), timeout=20)
    assert code == 2 and "no workflow" in err and out == ""
    workflow_id = await started(store, "watch-finished")
    await control_workflow(store, "cancel", "watch-cancel", workflow_id, "done with it")
    code, out, err = await cli(env, "watch", workflow_id[:8], timeout=20)
    assert code == 0, err
    assert out.strip() == f"workflow {workflow_id} has already finished: canceled"
    code, out, err = await cli(env, "watch", workflow_id, "--json", timeout=20)
    assert code == 0, err
    assert json.loads(out) == {"workflow_id": workflow_id, "state": "canceled", "finished": True}


async def test_start_wait_stops_following_at_its_timeout_and_says_how_to_follow(
    store: EventStore, env: dict[str, str]
) -> None:
    params = [arg for key, value in PARAMS.items() for arg in ("--param", f"{key}={value}")]
    # No worker: the workflow stays `created`, so only the timeout ends the wait.
    code, out, err = await cli(env, "start", SPEC, *params, "--wait", "--timeout", "1.5",
                               "--json", timeout=30)
    assert code == 1, err
    shown = json.loads(out)
    assert shown["state"] is None and shown["timed_out"] is True
    workflow_id = shown["workflow_id"]
    assert f"workflow {workflow_id} is still running after 1.5 s" in err
    assert f"rebalancer watch {workflow_id[:8]}" in err
    # It goes on: the start was recorded, and nothing stopped it.
    assert await store.stream_version(f"workflow-{workflow_id}") == 1
    code, _, err = await cli(env, "start", SPEC, *params, "--timeout", "5")
    assert code == 2 and "--timeout limits --wait" in err


async def test_specs_show_prints_the_params_with_types_and_the_tasks_with_kinds(
    env: dict[str, str]
) -> None:
    code, out, err = await cli(env, "specs", "show", SPEC)
    assert code == 0, err
    assert out.startswith(f"spec {SPEC}: ")
    lines = out.splitlines()
    assert any(line.split()[:2] == ["from_amount", "amount"] for line in lines)
    assert any(line.split()[:3] == ["0", "buy_in_source_spot", "trade"] for line in lines)
    assert any(line.split()[:3] == ["7", "sub_spot_to_futures", "transfer"] for line in lines)
    # A trade says how it is sliced and what a partial fill leads to (the defaults here).
    assert "  0  buy_in_source_spot     trade (twap 4 slices; below 99% filled: needs_attention)" \
        in lines
    # The spec as loaded follows the `---`, as YAML that loads back to the same spec.
    loaded = yaml.safe_load(out.split("\n---\n", 1)[1])
    assert loaded["name"] == SPEC and len(loaded["tasks"]) == 8
    code, out, err = await cli(env, "specs", "show", SPEC, "--json")
    assert code == 0, err
    assert json.loads(out) == loaded
    code, _, err = await cli(env, "specs", "show", "no_such_spec")
    assert code == 2 and "unknown spec 'no_such_spec'" in err


async def test_start_takes_a_spec_file_only_as_the_configured_spec_it_is(
    store: EventStore, env: dict[str, str], tmp_path: Path
) -> None:
    params = [arg for key, value in PARAMS.items() for arg in ("--param", f"{key}={value}")]
    source = (BUILTIN_DIR / f"{SPEC}.yaml").read_text(encoding="utf-8")
    same = tmp_path / "same.yaml"
    same.write_text(source, encoding="utf-8")
    code, out, err = await cli(env, "start", str(same), *params, "--json")
    assert code == 0, err
    assert await store.stream_version(f"workflow-{json.loads(out)['workflow_id']}") == 1
    data = yaml.safe_load(source)
    data["description"] = "changed"
    changed = tmp_path / "changed.yml"
    changed.write_text(yaml.safe_dump(data), encoding="utf-8")
    code, _, err = await cli(env, "start", str(changed), *params)
    assert code == 2 and "differs from the configured spec" in err
    data["name"] = "my_own_path"
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(data), encoding="utf-8")
    code, _, err = await cli(env, "start", str(mine), *params)
    assert code == 2 and "not configured" in err
    assert f"add {resolved(tmp_path)} to `specs:`" in err
    # A broken file: its problems, before anything is sent.
    data["tasks"][0]["kind"] = "teleport"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(data), encoding="utf-8")
    code, _, err = await cli(env, "start", str(broken), *params)
    assert code == 2 and "broken.yaml" in err and "teleport" in err


@pytest.mark.parametrize("given", ["specs/slow_twap.yml", "slow_twap.yaml", "./slow_twap"])
async def test_start_of_a_path_that_is_not_there_says_no_such_file(
    env: dict[str, str], given: str
) -> None:
    for command in ("start", "preview"):
        code, out, err = await cli(env, command, given, "--param", "from_amount=1")
        assert code == 2 and out == ""
        assert err == f"rebalancer: no such spec file: {given}\n"
    # A file that is there but no spec file: said so, not "unknown spec".
    code, _, err = await cli(env, "start", "docs/specs.md")  # run from the repository's root
    assert code == 2
    assert err == "rebalancer: docs/specs.md: not a spec file (a .yaml or .yml file)\n"
