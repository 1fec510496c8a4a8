"""The commands the user documentation shows, read out of docs/*.md.

A runnable command is a line `$ rebalancer ...` (optionally after `VAR=value` assignments) in a
fenced ```console block; the lines under it, up to the next `$ ` line or the fence, are what it
prints. A trailing `  # ...` annotation says what the runner must know:

- `exit N`: the exit status it must end with (default 0);
- `sets <name>`: the placeholder it defines from what it prints (a workflow id, a txid);
- `background`: it runs until the end (`serve`), stopped with SIGTERM;
- `last`: it runs after everything else (`infra down`).

Placeholders such as `<workflow-id>` stand for what an earlier command set. In the output shown,
`…` stands for anything and a run of spaces for any run of spaces.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from rebalancer.cli.parser import build_parser

FENCE: Final = re.compile(r"^```(\S*)\s*$")
COMMAND: Final = re.compile(r"^\$ (?P<line>.*)$")
ANNOTATION: Final = re.compile(
    r"\s{2,}# (?P<notes>(?:exit \d|sets <[a-z-]+>|background|last)"
    r"(?:, (?:exit \d|sets <[a-z-]+>|background|last))*)$")
PLACEHOLDER: Final = re.compile(r"<[a-z][a-z-]*>")
ASSIGNMENT: Final = re.compile(r"^[A-Z][A-Z0-9_]*=")
INLINE_CODE: Final = re.compile(r"`([^`]+)`")


@dataclass
class DocCommand:
    """One runnable command of the docs, where it is, and what the runner must check."""

    file: str
    line: int
    text: str  # as written, without the annotation
    env: dict[str, str]
    args: list[str]
    exit: int = 0
    sets: list[str] = field(default_factory=list)
    background: bool = False
    last: bool = False
    output: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def subcommands() -> dict[str, set[str]]:
    """Every command of the parser, with the actions of the groups (`specs show`, ...)."""
    parser = build_parser()
    found: dict[str, set[str]] = {}
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for name, sub in action.choices.items():  # type: ignore[union-attr]
            actions: set[str] = set()
            if sub._subparsers is not None:
                for inner in sub._subparsers._group_actions:
                    actions |= set(inner.choices or ())  # type: ignore[arg-type]
            found[name] = actions
    return found


def command_path(words: list[str], known: dict[str, set[str]]) -> str | None:
    """`rebalancer specs show` for ["specs", "show", "NAME"]; None when it is no command."""
    if not words or words[0] not in known:
        return None
    if known[words[0]]:
        if len(words) < 2 or words[1] not in known[words[0]]:
            return None
        return f"rebalancer {words[0]} {words[1]}"
    return f"rebalancer {words[0]}"


def parse(path: Path) -> list[DocCommand]:
    """Every `$ rebalancer` line in a console block of `path`, in order; raises ValueError for a
    `$ ` line in a console block that is not one."""
    commands: list[DocCommand] = []
    fence: str | None = None
    current: DocCommand | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        opened = FENCE.match(line)
        if opened:
            fence = opened.group(1) if fence is None else None
            current = None
            continue
        if fence != "console":
            continue
        command = COMMAND.match(line)
        if command is None:
            if current is not None:
                current.output.append(line)
            continue
        current = _command(path.name, number, command.group("line"))
        commands.append(current)
    return commands


def _command(file: str, number: int, line: str) -> DocCommand:
    notes: list[str] = []
    annotation = ANNOTATION.search(line)
    if annotation:
        notes = annotation.group("notes").split(", ")
        line = line[: annotation.start()]
    words = shlex.split(line)
    env: dict[str, str] = {}
    while words and ASSIGNMENT.match(words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if not words or words[0] != "rebalancer":
        raise ValueError(f"{file}:{number}: a console block runs only `rebalancer` commands")
    found = DocCommand(file, number, line, env, words[1:])
    for note in notes:
        if note.startswith("exit "):
            found.exit = int(note.removeprefix("exit "))
        elif note.startswith("sets "):
            found.sets.append(note.removeprefix("sets "))
        elif note == "background":
            found.background = True
        elif note == "last":
            found.last = True
    return found


def stray_mentions(path: Path, known: dict[str, set[str]]) -> list[tuple[int, str]]:
    """Where `path` shows a `rebalancer` command other than in a console block's `$ ` line or in
    inline code: another code block, an indented block, prose. Inline code is returned too, as
    (line, command path), for the caller to check against the commands run."""
    found: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        opened = FENCE.match(line)
        if opened:
            fence = opened.group(1) if fence is None else None
            continue
        if fence == "console":
            continue  # `$ ` lines are the commands; the rest is what they print
        spans = INLINE_CODE.findall(line) if fence is None else []
        for span in spans:
            words = span.split()
            if words and words[0] == "rebalancer":
                where = command_path(words[1:], known)
                if where is not None:
                    found.append((number, where))
        rest = INLINE_CODE.sub(" ", line) if fence is None else line
        words = rest.replace("(", " ").split()
        for i, word in enumerate(words):
            if word == "rebalancer" and command_path(words[i + 1:], known) is not None:
                found.append((number, f"outside a console block: {line.strip()}"))
    return found


def dollar_lines(path: Path) -> set[int]:
    """Every line of `path` that looks like a shown `rebalancer` command, read independently of
    `parse`: what the runner must have run."""
    return {number for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if re.match(r"^\s*\$ .*\brebalancer\b", line)}


def output_pattern(shown: str, values: dict[str, str]) -> re.Pattern[str]:
    """A shown output line as a pattern: placeholders filled, `…` anything, spaces any spaces."""
    parts = re.split(r"(…|<[a-z][a-z-]*>|\s{2,})", shown.strip())
    regex = []
    for part in parts:
        if part == "…":
            regex.append(".*")
        elif PLACEHOLDER.fullmatch(part):
            regex.append(re.escape(values.get(part, part)))
        elif part and part.isspace():
            regex.append(r"\s+")
        else:
            regex.append(re.escape(part))
    return re.compile("".join(regex))
