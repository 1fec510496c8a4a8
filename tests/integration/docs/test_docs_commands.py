"""Every command the user documentation shows is run, as a user would type it, and ends as shown.

One stack for all of them, made by the docs' own commands: `rebalancer infra up` on a fresh
REBALANCER_HOME (embedded PostgreSQL and NATS), `rebalancer serve` on the simulated world (the
command serve.md shows, run in the background), the configuration and spec directory in
docs/examples/. A command runs through the command line's own `main` in this process
(the interpreter's start, about a second, times 80 commands would be most of the run), with its
environment and the repository as its directory; `serve` runs as its own process. The docs are
read in the order a reader meets them, the README's console blocks last; placeholders
such as `<attention-id>` come from the command that `sets` them. Between commands the runner
waits until every workflow in the store has settled (it ended, is paused, or waits on an
operator) and the read model has caught up, so that a command reads what the one before it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psycopg
import pytest

from rebalancer.cli.main import main
from rebalancer.embedded.servers import load_info
from tests.conftest import ROOT
from tests.integration.docs.commands import (
    DocCommand,
    command_path,
    dollar_lines,
    output_pattern,
    parse,
    stray_mentions,
    subcommands,
)

DOCS: Final = ROOT / "docs"
README: Final = ROOT / "README.md"
# The order a reader meets them: set up, serve, write a spec, settle, alerts, then the rest.
ORDER: Final = ("configuration.md", "serve.md", "specs.md", "needs-attention.md", "alerts.md",
                "contracts.md", "exchanges.md", "security.md", "operations.md")
UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SHORT_ID: Final = re.compile(r"\b[0-9a-f]{8}\b")
TXID: Final = re.compile(r"txid[= ]([0-9a-f]{64})")
SETTLED: Final = frozenset({"done", "failed", "canceled", "paused"})


def doc_files() -> list[Path]:
    return [DOCS / name for name in ORDER]


def run_files() -> list[Path]:
    """What is run: the docs, then the README's console blocks (its command synopsis, with
    placeholders in capitals, is not a command to run and is not checked for stray mentions)."""
    return [*doc_files(), README]


def all_commands() -> list[DocCommand]:
    return [command for path in run_files() for command in parse(path)]


def test_every_doc_is_read_and_shows_commands_only_where_they_are_run() -> None:
    # A new page is not skipped silently: it must be given its place in the order.
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(ORDER)
    commands = all_commands()
    assert len(commands) >= 40, f"only {len(commands)} commands found in docs/"
    known = subcommands()
    run = {command_path(c.args, known) for c in commands}
    assert None not in run, [c.where for c in commands if command_path(c.args, known) is None]
    # A command shown failing shows what it says: the message a reader will meet.
    assert not [c.where for c in commands if c.exit and not c.output]
    problems = []
    for path in run_files():
        parsed = {c.line for c in parse(path)}
        # Every `$ ... rebalancer` line is one the parser found (not in another kind of block).
        problems += [f"{path.name}:{n}: not in a console block"
                     for n in sorted(dollar_lines(path) - parsed)]
        for number, what in stray_mentions(path, known) if path != README else ():
            if what.startswith("outside"):
                problems.append(f"{path.name}:{number}: a command {what}")
            elif what not in run:
                problems.append(f"{path.name}:{number}: `{what}` is mentioned but never run")
    assert not problems, "\n".join(problems)


def test_shown_output_is_matched_line_by_line_and_in_order() -> None:
    command = DocCommand("x.md", 1, "rebalancer status", {}, ["status"],
                         output=["state     <id> done", "fees  … ETH"])
    values = {"<id>": "0a1b2c3d"}
    matches(command, ["workflow x", "state 0a1b2c3d done", "fees 0.1 ETH"], values, "")
    for printed in (["fees 0.1 ETH", "state 0a1b2c3d done"],  # out of order
                    ["state 0a1b2c3d failed", "fees 0.1 ETH"],  # another state
                    ["state <id> done", "fees 0.1 ETH"]):  # the placeholder, not its value
        with pytest.raises(AssertionError, match="shown but not printed"):
            matches(command, printed, values, "")


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Ran:
    command: DocCommand
    argv: list[str]
    code: int
    out: str
    err: str


class Runner:
    """Runs doc commands on one fresh home; knows the placeholders and the workflows seen."""

    def __init__(self, home: Path, log_dir: Path) -> None:
        self.home = home
        self.log_dir = log_dir
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")},
                    "REBALANCER_HOME": str(home),
                    "REBALANCER_CONFIG": str(DOCS / "examples" / "config.yaml"),
                    # The simulated world's delays (confirmations, fills) 20 times shorter.
                    "REBALANCER_SIM_TIME_SCALE": "20", "PYTHONUNBUFFERED": "1"}
        self.values: dict[str, str] = {}
        self.background: list[tuple[DocCommand, subprocess.Popen[bytes], Path]] = []
        self.ran: list[Ran] = []

    def argv(self, command: DocCommand) -> list[str]:
        filled = []
        for arg in command.args:
            for name in re.findall(r"<[a-z][a-z-]*>", arg):
                assert name in self.values, f"{command.where}: {name} is used before it is set"
                arg = arg.replace(name, self.values[name])
            filled.append(arg)
        return [sys.executable, "-m", "rebalancer", *filled]

    def run(self, command: DocCommand) -> None:
        argv = self.argv(command)
        env = {**self.env, **command.env}
        if command.background:
            log = self.log_dir / f"background-{command.line}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=out)
            self.background.append((command, process, log))
            self.answering(process, log)
            return
        began = time.monotonic()
        code, out, err = self.in_process(command, env)
        ran = Ran(command, argv, code, out, err)
        self.ran.append(ran)
        assert ran.code == command.exit, f"exit {ran.code}, not {command.exit}: {shown(ran)}"
        # What it sets first: its own output may show it.
        for name in command.sets:
            self.values[name] = self.extract(command, name, ran.out + ran.err)
            if name == "<workflow-id>":
                self.values["<short-id>"] = self.values[name][:8]
        matches(command, (ran.out + ran.err).splitlines(), self.values, shown(ran))
        self.settle(command)
        print(f"{time.monotonic() - began:5.1f} s  {command.where}  {command.text}")

    def in_process(self, command: DocCommand, env: dict[str, str]) -> tuple[int, str, str]:
        """The command line's own `main`, in this process with the command's environment: what
        `python -m rebalancer` runs, without an interpreter's start for each of 80 commands."""
        out, err = io.StringIO(), io.StringIO()
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            with (contextlib.chdir(ROOT), contextlib.redirect_stdout(out),
                  contextlib.redirect_stderr(err)):
                try:
                    code = main(self.argv(command)[3:])
                except SystemExit as e:  # argparse: usage errors and --help
                    code = e.code if isinstance(e.code, int) else 2
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return code, out.getvalue(), err.getvalue()

    def extract(self, command: DocCommand, name: str, text: str) -> str:
        if name.endswith("-id>"):
            found = UUID.search(text)
            if found:
                return found.group(0)
            short = SHORT_ID.search(text)
            assert short, f"{command.where}: no workflow id in its output for {name}"
            with self.connect() as conn:
                row = conn.execute("select distinct stream_id from events where stream_id like"
                                   " %s", (f"workflow-{short.group(0)}%",)).fetchall()
            assert len(row) == 1, f"{command.where}: {short.group(0)} names {row}"
            return str(row[0][0]).removeprefix("workflow-")
        if name == "<txid>":
            found = TXID.search(text)
            assert found, f"{command.where}: no txid in its output"
            return found.group(1)
        raise AssertionError(f"{command.where}: cannot set {name}")

    def connect(self) -> psycopg.Connection[tuple[object, ...]]:
        info = load_info(self.home)
        assert info is not None, "no embedded servers yet"
        return psycopg.connect(info.database_url, autocommit=True)

    def answering(self, process: subprocess.Popen[bytes], log: Path) -> None:
        """Until `serve` answers a query over NATS (a start before that would find nobody)."""
        from rebalancer.api import request

        info = load_info(self.home)
        assert info is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text(encoding="utf-8")
            try:
                reply = asyncio.run(request(info.nats_url, "rebalancer.query.workflows", {},
                                            timeout=2))
                if reply.get("ok"):
                    return
            except Exception:  # not subscribed yet
                pass
            time.sleep(0.3)
        raise AssertionError("serve never answered: " + log.read_text(encoding="utf-8"))

    def settle(self, command: DocCommand) -> None:
        """Until every workflow has settled and the read model shows its last version."""
        if command.last or load_info(self.home) is None:  # no servers (yet, or any more)
            return
        deadline = time.monotonic() + 90
        while True:
            with self.connect() as conn:
                try:
                    streams = conn.execute("select distinct stream_id from events"
                                           " where stream_id like 'workflow-%'").fetchall()
                except psycopg.errors.UndefinedTable:
                    return  # not migrated yet: no workflow either
                pending = [str(s).removeprefix("workflow-") for (s,) in streams]
                pending = [i for i in pending if not settled(conn, i)]
            if not pending:
                return
            assert time.monotonic() < deadline, f"after {command.where}: {pending} never settled"
            time.sleep(0.1)

    def stop_background(self, check: bool = True) -> None:
        """SIGTERM to each background command; with `check`, its exit and output as shown."""
        for command, process, log in self.background:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                if check:
                    raise AssertionError(f"{command.where}: did not stop on SIGTERM") from None
            if not check:
                continue
            text = log.read_text(encoding="utf-8")
            assert code == command.exit, f"{command.where}: exit {code}\n{text}"
            matches(command, text.splitlines(), self.values, f"{command.where}\n{text}")
        self.background = []


def shown(ran: Ran) -> str:
    command = ran.command
    return f"{command.where}: `{command.text}`\n--- stdout\n{ran.out}--- stderr\n{ran.err}"


def matches(command: DocCommand, lines: list[str], values: dict[str, str], shown: str) -> None:
    """The output shown under `command` appears in `lines`, in order."""
    at = 0
    for expected in (line for line in command.output if line.strip()):
        pattern = output_pattern(expected, values)
        while at < len(lines) and not pattern.fullmatch(lines[at].strip()):
            at += 1
        assert at < len(lines), f"shown but not printed: {expected!r}\n{shown}"
        at += 1


def settled(conn: psycopg.Connection[tuple[object, ...]], workflow_id: str) -> bool:
    rows = conn.execute(
        "select type, data->>'dest', data->>'task_name', version from events"
        " where stream_id = %s order by version", (f"workflow-{workflow_id}",)).fetchall()
    if not rows:
        return True
    state, tasks = "created", {}
    for kind, dest, task, _ in rows:
        if kind == "WorkflowStateChanged":
            state = str(dest)
        elif kind == "TaskStateChanged":
            tasks[task] = dest
    waiting = state == "needs_attention" and "needs_attention" in tasks.values()
    if state not in SETTLED and not waiting:
        return False
    seen = conn.execute("select version from workflows where workflow_id = %s",
                        (workflow_id,)).fetchone()
    return seen is not None and seen[0] == rows[-1][3]


def test_every_command_the_docs_show_runs_and_ends_as_shown(tmp_path: Path) -> None:
    commands = all_commands()
    runner = Runner(tmp_path / "home", tmp_path)
    try:
        for command in (c for c in commands if not c.last):
            runner.run(command)
        runner.stop_background()
        for command in (c for c in commands if c.last):
            runner.run(command)
    finally:
        runner.stop_background(check=False)
        # Whatever happened, no server is left running.
        subprocess.run([sys.executable, "-m", "rebalancer", "infra", "down"], env=runner.env,
                       cwd=ROOT, capture_output=True, timeout=60, check=False)
    ran = {(r.command.file, r.command.line) for r in runner.ran}
    ran |= {(c.file, c.line) for c in commands if c.background}
    shown = {(path.name, n) for path in run_files() for n in dollar_lines(path)}
    # Every command shown was run (and only those): nothing in a block was skipped.
    assert ran == shown
