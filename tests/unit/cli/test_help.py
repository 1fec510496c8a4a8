"""Every command's `--help` explains every argument it takes (issue 13: help for every option)."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from rebalancer.cli import build_parser


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command's parser with the words that reach it."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, (*path, name))
    return found


ALL = commands(build_parser())


def test_every_command_is_reached() -> None:
    names = {" ".join(path) for path, _ in ALL}
    assert {"watch", "start", "specs show", "serve", "resolve", "sim ledger"} <= names
    assert len(ALL) > 25


@pytest.mark.parametrize(("path", "parser"), ALL, ids=[" ".join(p) or "rebalancer" for p, _ in ALL])
def test_every_argument_has_help(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    missing = [action.dest for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction)
               and not (action.help and action.help.strip())]
    assert missing == [], f"`rebalancer {' '.join(path)}`: no help for {missing}"
    # And `--help` itself prints without error.
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*path, "--help"])
    assert exited.value.code == 0 and "usage: rebalancer" in out.getvalue()
