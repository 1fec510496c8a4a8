"""The dashboard's pure parts: where it may listen, the operator token, escaping."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from projections.workflows import TaskView, WorkflowView
from rebalancer.cli.main import main
from rebalancer.errors import SpecError
from rebalancer.service import serve
from rebalancer.settings import Settings
from rebalancer.web import Bind, parse_bind
from rebalancer.web.operator import operator_token, token_matches
from rebalancer.web.pages import workflow_page


@pytest.mark.parametrize(("text", "bind"), [
    ("8080", Bind("127.0.0.1", 8080)),
    ("127.0.0.1:9000", Bind("127.0.0.1", 9000)),
    ("localhost:9000", Bind("localhost", 9000)),
    ("[::1]:8080", Bind("::1", 8080)),
    (":8080", Bind("127.0.0.1", 8080)),
])
def test_a_bare_port_or_a_loopback_address_is_taken(text: str, bind: Bind) -> None:
    assert parse_bind(text) == bind
    assert bind.loopback


@pytest.mark.parametrize("text", ["0.0.0.0:8080", "192.168.1.5:80", "[::]:8080",
                                  "desk.example:8080"])
def test_an_address_beyond_this_machine_needs_the_opt_in(text: str) -> None:
    with pytest.raises(SpecError, match=r"not a loopback address.*--http-allow-remote"):
        parse_bind(text)
    assert not parse_bind(text, allow_remote=True).loopback


@pytest.mark.parametrize("text", ["", "http", "127.0.0.1:", "127.0.0.1:99999"])
def test_a_malformed_address_is_refused(text: str) -> None:
    with pytest.raises(SpecError, match="--http"):
        parse_bind(text)


def test_serve_refuses_a_public_bind_before_starting_anything(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    monkeypatch.setenv("REBALANCER_HOME", str(tmp_path / "home"))
    assert main(["serve", "--http", "0.0.0.0:8080"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()  # no server was started


@pytest.fixture
def port_in_use() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        yield int(taken.getsockname()[1])


def test_serve_refuses_an_address_in_use_in_one_line_before_starting_anything(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, port_in_use: int) -> None:
    monkeypatch.setenv("REBALANCER_HOME", str(tmp_path / "home"))
    # Nothing answers here: reaching the database at all would be exit 4, not 2.
    monkeypatch.setenv("REBALANCER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("REBALANCER_CONNECT_TIMEOUT", "1")
    assert main(["serve", "--http", str(port_in_use)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"rebalancer: cannot listen on 127.0.0.1:{port_in_use}: address"
                            " already in use\n")
    assert not (tmp_path / "home").exists()  # no embedded server was started


def test_the_demo_refuses_an_address_in_use_before_starting_anything(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, port_in_use: int) -> None:
    monkeypatch.setenv("REBALANCER_HOME", str(tmp_path / "home"))
    # Nothing answers at either: reaching them at all would be another exit status.
    monkeypatch.setenv("REBALANCER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("REBALANCER_NATS_URL", "nats://127.0.0.1:1")
    assert main(["demo", "--http", f"127.0.0.1:{port_in_use}"]) == 2
    assert capsys.readouterr().err == (f"rebalancer: cannot listen on 127.0.0.1:{port_in_use}:"
                                       " address already in use\n")


async def test_serve_binds_before_any_component_starts(port_in_use: int) -> None:
    # Refused before the store is opened: this database does not exist.
    with pytest.raises(SpecError, match=f"^cannot listen on 127.0.0.1:{port_in_use}: address"
                                        " already in use$"):
        await serve(Settings(), "postgresql://nobody@127.0.0.1:1/none", None,
                    http=Bind("127.0.0.1", port_in_use), stop=asyncio.Event())


def test_the_token_comes_from_the_variable_or_a_file_and_must_be_long(tmp_path: Path) -> None:
    assert operator_token(Settings()) is None
    # Set but empty (compose's `${REBALANCER_OPERATOR_TOKEN:-}` when unset): read-only; set
    # to blanks, a token typed wrong: refused, not taken as none.
    assert operator_token(Settings(_env_file=None, **{"operator_token": ""})) is None
    with pytest.raises(SpecError, match="shorter than 16"):
        operator_token(Settings(operator_token=SecretStr(" " * 20)))
    assert operator_token(Settings(operator_token=SecretStr("a" * 20))) == "a" * 20
    token_file = tmp_path / "token"
    token_file.write_text("b" * 24 + "\n")
    token_file.chmod(0o600)
    assert operator_token(Settings(operator_token_file=token_file)) == "b" * 24
    with pytest.raises(SpecError, match="shorter than 16") as short:
        operator_token(Settings(operator_token=SecretStr("hunter2")))
    assert "hunter2" not in str(short.value)
    with pytest.raises(SpecError, match="one way"):
        operator_token(Settings(operator_token=SecretStr("a" * 20),
                                operator_token_file=token_file))
    with pytest.raises(SpecError, match="cannot read"):
        operator_token(Settings(operator_token_file=tmp_path / "missing"))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602])
def test_serve_refuses_a_token_file_others_can_read_or_write_before_starting_anything(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, mode: int) -> None:
    token_file = tmp_path / "operator.token"
    token_file.write_text("d" * 24 + "\n")
    token_file.chmod(mode)
    monkeypatch.setenv("REBALANCER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REBALANCER_OPERATOR_TOKEN_FILE", str(token_file))
    assert main(["serve", "--http", "8080"]) == 2
    err = capsys.readouterr().err
    assert err == (f"rebalancer: the operator token file {token_file} is readable or writable"
                   f" by others (mode {mode:04o}); chmod 600 {token_file}\n")
    assert "d" * 24 not in err
    assert not (tmp_path / "home").exists()  # no server was started
    token_file.chmod(0o600)
    assert operator_token(Settings(operator_token_file=token_file)) == "d" * 24


def test_the_token_must_match_exactly() -> None:
    token = "c" * 20
    assert token_matches(token, token) and token_matches(token, f" {token}\n")
    assert not token_matches(token, None) and not token_matches(token, "")
    assert not token_matches(token, token[:-1]) and not token_matches(token, token + "c")


def test_every_value_on_a_page_is_escaped() -> None:
    evil = '<script>alert("x")</script>'
    view = WorkflowView(workflow_id="w" * 36, stream_id="workflow-w", spec_name=evil,
                        params={"note": evil}, reason=evil,
                        tasks=[TaskView(0, "t", "trade", error={"message": evil},
                                        request_params={"x": evil})])
    page = workflow_page(view, [], evil, operator=True)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page


def test_a_task_needing_attention_offers_the_commands_and_a_form_per_unclaimed_candidate(
) -> None:
    from rebalancer.web.pages import attention

    error = {"code": "unknown_outcome", "message": "cannot tell which one is ours",
             "candidates": [
                 {"id": "11", "txid": "aa" * 32, "amount": "0.2", "at": "t1",
                  "claimed_by_workflow": None},
                 {"id": "12", "txid": None, "amount": "0.2", "at": "t2",
                  "claimed_by_workflow": "0f" * 16}],
             "commands": ["rebalancer resolve W withdraw_x --outcome done --result id=11",
                          "rebalancer resolve W withdraw_x --outcome failed --note 'x'"]}
    task = TaskView(0, "withdraw_x", "withdraw", "needs_attention", error=error)  # type: ignore[arg-type]
    read_only = attention("w" * 36, task, operator=False)
    assert "--outcome done --result id=11" in read_only and "claimed by" in read_only
    assert "<form" not in read_only  # no buttons without a token
    page = attention("w" * 36, task, operator=True)
    # Done with the unclaimed candidate (its id and txid), resend, failed: three forms.
    assert page.count('action="/actions/resolve"') == 3
    assert 'name="result_id" value="11"' in page and f'value="{"aa" * 32}"' in page
    assert 'name="result_id" value="12"' not in page  # another workflow's: not offered


def test_a_form_becomes_the_nats_command_body() -> None:
    from rebalancer.web.app import _command_body

    resolve = _command_body("resolve", {
        "command_id": "web-1", "workflow_id": "w", "task": "withdraw_x", "outcome": "done",
        "note": "checked", "result_id": "11", "result_txid": "ab", "result_amount": "",
        "token": "never in a body"})
    assert resolve == {"command_id": "web-1", "workflow_id": "w", "task": "withdraw_x",
                       "outcome": "done", "note": "checked",
                       "result": {"id": "11", "txid": "ab"}}
    pause = _command_body("pause", {"command_id": "web-2", "workflow_id": "w", "reason": ""})
    assert pause == {"command_id": "web-2", "workflow_id": "w"}
    assert _command_body("cancel", {"workflow_id": "w", "reason": "why"}) == {
        "command_id": "", "workflow_id": "w", "reason": "why"}


@pytest.mark.parametrize(("bind", "hosts", "host", "allowed"), [
    ("127.0.0.1", "", "127.0.0.1:8080", True),
    ("127.0.0.1", "", "localhost:8080", True),
    ("127.0.0.1", "", "evil.example:8080", False),
    # A container's bind on every interface, published on the host's loopback: the same rule.
    ("0.0.0.0", "", "127.0.0.1:8080", True),
    ("0.0.0.0", "", "evil.example:8080", False),
    ("0.0.0.0", "", "0.0.0.0:8080", False),
    # Behind a proxy, the names it serves the dashboard at.
    ("0.0.0.0", "desk.example", "DESK.example", True),
    ("0.0.0.0", "desk.example", "other.example", False),
])
async def test_a_host_that_is_not_ours_is_refused_on_every_bind(
        bind: str, hosts: str, host: str, allowed: bool) -> None:
    from typing import Any

    from aiohttp.test_utils import TestClient, TestServer

    from rebalancer.accounts import load_accounts
    from rebalancer.web.app import Dashboard
    from rebalancer.web.binding import Bind

    store: Any = None  # /healthz reads nothing: the guard answers before any page
    names = frozenset(h for h in hosts.split(",") if h)
    dashboard = Dashboard(store, load_accounts(), dict, store, Bind(bind, 8080), hosts=names)
    async with TestClient(TestServer(dashboard.app())) as client:
        response = await client.get("/healthz", headers={"Host": host})
        assert (response.status == 200) is allowed, await response.text()


@pytest.mark.parametrize(("origin", "hosts", "same"), [
    (None, frozenset(), True),
    ("http://127.0.0.1:8080", frozenset(), True),
    # A TLS proxy: the page is https, the request reaching serve plain http.
    ("https://desk.example", frozenset({"desk.example"}), True),
    ("https://evil.example", frozenset({"desk.example"}), False),
    ("null", frozenset(), False),
])
def test_an_origin_is_ours_by_its_name_whatever_its_scheme(
        origin: str | None, hosts: frozenset[str], same: bool) -> None:
    from aiohttp.test_utils import make_mocked_request

    from rebalancer.web.app import LOOPBACK_NAMES, _same_origin

    headers = {"Host": "127.0.0.1:8080", **({"Origin": origin} if origin else {})}
    request = make_mocked_request("POST", "/actions/pause", headers=headers)
    assert _same_origin(request, LOOPBACK_NAMES | hosts) is same
