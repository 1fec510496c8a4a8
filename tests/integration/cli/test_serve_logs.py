"""`rebalancer serve` as an operator runs it (issue 13, parts 6 and 7): its log has one INFO
line per workflow move and per command, as JSON lines with --log-format json; `watch` follows
from now, replays with --from-start, and ends with its workflow. The built-in path on the
simulated world, through the command line only."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from rebalancer.specs.loading import builtin_specs
from tests.conftest import ROOT
from tests.integration.cli.test_habits import PARAMS, SPEC, cli

ARGS = [arg for key, value in PARAMS.items() for arg in ("--param", f"{key}={value}")]


def serve(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rebalancer", "serve", "--log-format", "json"],
            env={**{k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")},
                 **env, "PYTHONUNBUFFERED": "1"},
            cwd=ROOT, stdout=out, stderr=out)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def answered(env: dict[str, str], *args: str, timeout: float = 150) -> tuple[int, str, str]:
    """A command, again while `serve` is still starting (exit 4: nothing answers yet)."""
    for _ in range(120):
        code, out, err = await cli(env, *args, timeout=timeout)
        if code != 4:
            return code, out, err
        await asyncio.sleep(0.5)
    raise AssertionError(f"serve never answered: {err}")


async def paused(env: dict[str, str], workflow_id: str) -> None:
    """Pause it as soon as the worker has it running (from `created` pause is refused)."""
    for _ in range(200):
        code, _, err = await cli(env, "pause", workflow_id[:8])
        if code == 0:
            return
        assert code == 3 and "cannot pause a workflow that is created" in err, err
        await asyncio.sleep(0.05)
    raise AssertionError("never running")


def json_lines(log: Path) -> list[dict[str, Any]]:
    # Every line the service wrote is one JSON object: a shipper needs no other parser.
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


async def test_serve_logs_moves_and_commands_and_watch_follows_from_now(
    database_url: str, owner_database_url: str, nats_url: str, tmp_path: Path
) -> None:
    env = {"REBALANCER_DATABASE_URL": database_url,
           "REBALANCER_MIGRATE_DATABASE_URL": owner_database_url,
           "REBALANCER_NATS_URL": nats_url, "REBALANCER_HOME": str(tmp_path / "home"),
           "REBALANCER_SIM_TIME_SCALE": "20"}
    log = tmp_path / "serve.log"
    process = serve(env, log)
    try:
        code, out, err = await answered(env, "start", SPEC, *ARGS, "--command-id",
                                        f"logs-{uuid.uuid4()}", "--wait", "--timeout", "120",
                                        "--json")
        assert code == 0, err
        done = json.loads(out)
        assert done["state"] == "done"
        workflow_id = done["workflow_id"]
        # Finished: `watch` says so at once; --from-start replays it and ends with it.
        code, out, err = await cli(env, "watch", workflow_id[:8], timeout=30)
        assert code == 0 and out.strip().endswith("has already finished: done"), err
        code, out, err = await cli(env, "watch", workflow_id[:8], "--from-start", "--json",
                                   timeout=30)
        assert code == 0, err
        replayed = [json.loads(line) for line in out.splitlines()]
        assert replayed[0]["version"] == 1 and replayed[-1]["data"]["dest"] == "done"

        # Running: `watch` shows only what happens from now on, and ends when it does.
        code, out, err = await cli(env, "start", SPEC, *ARGS, "--json")
        assert code == 0, err
        second = json.loads(out)["workflow_id"]
        await paused(env, second)
        watching = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rebalancer", "watch", second[:8], "--json",
            env={**os.environ, **env}, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await asyncio.sleep(3)  # its subscription is in place (it would miss the resume only)
        code, _, err = await cli(env, "resume", second[:8])
        assert code == 0, err
        seen_out, seen_err = await asyncio.wait_for(watching.communicate(), 120)
        assert watching.returncode == 0, seen_err.decode()
        seen = [json.loads(line) for line in seen_out.decode().splitlines()]
        assert seen and seen[-1]["data"]["dest"] == "done"
        assert all(e["stream_id"] == f"workflow-{second}" for e in seen)
        # Nothing from before the pause was replayed.
        code, out, _ = await cli(env, "history", second[:8], "--json")
        pause_version = next(e["version"] for e in json.loads(out)
                             if e["data"].get("trigger") == "pause")
        assert min(e["version"] for e in seen) > pause_version
    finally:
        stop(process)

    lines = json_lines(log)
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    moves = [line for line in lines if line.get("workflow_id") == workflow_id
             and line["logger"] == "rebalancer.engine"]
    tasks = [task.name for task in builtin_specs()[SPEC].tasks]
    # Every task's moves, and the workflow's own, each an INFO line naming the move.
    assert {line["task"] for line in moves} == {*tasks, "_workflow"}
    assert all(line["level"] == "INFO" for line in moves)
    assert any(line["message"] == f"workflow {workflow_id[:8]} _workflow: running -> done"
               for line in moves)
    for task in tasks:  # each task's last move, as a person reads it
        assert any(line["message"].startswith(f"workflow {workflow_id[:8]} {task}: ")
                   and line["message"].endswith(" -> done") for line in moves), task
    commands = [line["message"] for line in lines if line["logger"] == "rebalancer.api"
                and line.get("workflow_id") in (workflow_id, second)]
    assert f"command start {workflow_id[:8]}: ok, started" in commands
    assert f"command pause {second[:8]}: ok, paused" in commands
    assert f"command resume {second[:8]}: ok, running" in commands
    # No secret reaches the log: not the database's password, nor NATS's.
    text = log.read_text(encoding="utf-8")
    for url in (database_url, nats_url):
        password = _password(url)
        if password:
            assert password not in text


def _password(url: str) -> str | None:
    from urllib.parse import urlsplit

    import psycopg

    if "://" in url and not url.startswith("postgres"):
        return urlsplit(url).password
    return psycopg.conninfo.conninfo_to_dict(url).get("password")  # type: ignore[return-value]
