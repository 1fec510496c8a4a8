"""Specs from YAML files and plain data, parsed and statically validated; the built-in specs."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, get_args

import yaml
from pydantic import ValidationError

from rebalancer.accounts import Accounts
from rebalancer.errors import SpecError
from rebalancer.machines import TaskKind
from rebalancer.specs.models import DUPLICATE_TASK_NAME, ParamType, WorkflowSpec
from rebalancer.specs.validation import (
    InvalidSpecError,
    TaskDraft,
    draft_problems,
    spec_problems,
    validation_error_lines,
)

BUILTIN_DIR: Final = Path(__file__).resolve().parent / "builtin"
SPEC_SUFFIXES: Final = (".yaml", ".yml")


def spec_from_data(
    data: object, accounts: Accounts | None = None, *, source: str | None = None
) -> WorkflowSpec:
    """A validated spec from plain data (parsed YAML or JSON, or a stored snapshot).

    Raises InvalidSpecError listing every problem found: shape errors and bad references
    together, each naming its task. With `accounts`, literal account ids must exist.
    """
    subject = source or _subject(data)
    if not isinstance(data, Mapping):
        raise InvalidSpecError(subject, ["a spec is a mapping with name, params, tasks, result"])
    raw_tasks = data.get("tasks")
    tasks = raw_tasks if isinstance(raw_tasks, list) else []
    try:
        spec = WorkflowSpec.model_validate(data)
    except ValidationError as e:
        # Duplicate names are reported by draft_problems, once per task.
        problems = validation_error_lines(e, tasks, skip=frozenset({DUPLICATE_TASK_NAME}))
        # Check the references too, as far as the data can be read, so one run shows them all.
        problems += draft_problems(
            _raw_params(data.get("params")),
            [_draft(task) for task in tasks],
            _raw_result(data.get("result")),
            accounts=accounts,
        )
        raise InvalidSpecError(subject, list(dict.fromkeys(problems))) from e
    if problems := spec_problems(spec, accounts):
        raise InvalidSpecError(subject, problems)
    return spec


def load_spec_file(path: Path | str, accounts: Accounts | None = None) -> WorkflowSpec:
    """A validated spec from one YAML file; every error names the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: {_yaml_error_text(e)}") from e
    return spec_from_data(data, accounts, source=str(path))


def validate_file(path: Path | str, accounts: Accounts | None = None) -> WorkflowSpec:
    """For `rebalancer specs validate FILE`: the spec, or SpecError listing all its problems."""
    return load_spec_file(path, accounts)


def load_specs(
    dirs: Iterable[Path | str], accounts: Accounts | None = None
) -> dict[str, WorkflowSpec]:
    """Every `*.yaml`/`*.yml` spec in `dirs` by name; raises SpecError listing every bad file
    and every name defined twice."""
    specs: dict[str, WorkflowSpec] = {}
    origin: dict[str, Path] = {}
    problems: list[str] = []
    for directory in map(Path, dirs):
        if not directory.is_dir():
            problems.append(f"{directory}: not a directory")
            continue
        for path in sorted(p for p in directory.iterdir() if p.suffix in SPEC_SUFFIXES):
            try:
                spec = load_spec_file(path, accounts)
            except InvalidSpecError as e:
                problems += [f"{path}: {problem}" for problem in e.problems]
                continue
            except SpecError as e:
                problems.append(str(e))
                continue
            if spec.name in specs:
                first = origin[spec.name]
                problems.append(f"{path}: spec {spec.name!r} is already defined in {first}")
                continue
            specs[spec.name] = spec
            origin[spec.name] = path
    if problems:
        raise InvalidSpecError("specs", problems)
    return specs


@dataclass(frozen=True)
class BrokenSpec:
    """A spec file that cannot be used, and why in one line: the others stay usable."""

    name: str  # the `name:` it declares where readable, else the file's stem
    file: Path
    error: str


class SpecCatalogue(dict[str, WorkflowSpec]):
    """The usable specs by name, with the spec files that are broken beside them."""

    def __init__(self, specs: Mapping[str, WorkflowSpec] | None = None,
                 broken: Iterable[BrokenSpec] = ()) -> None:
        super().__init__(specs or {})
        self.broken: tuple[BrokenSpec, ...] = tuple(broken)

    def broken_named(self, name: str) -> BrokenSpec | None:
        return next((b for b in self.broken if b.name == name), None)


def scan_specs(dirs: Iterable[Path | str], accounts: Accounts | None = None) -> SpecCatalogue:
    """Every spec in `dirs` that loads, by name; a file that does not (bad YAML, invalid spec,
    a name already taken by an earlier file, an unreadable directory) is listed as broken
    instead of failing the lot: one typo in one file must not stop every other spec."""
    specs: dict[str, WorkflowSpec] = {}
    origin: dict[str, Path] = {}
    broken: list[BrokenSpec] = []
    for directory in map(Path, dirs):
        if not directory.is_dir():
            broken.append(BrokenSpec(directory.name, directory, "not a directory"))
            continue
        for path in sorted(p for p in directory.iterdir() if p.suffix in SPEC_SUFFIXES):
            try:
                spec = load_spec_file(path, accounts)
            except InvalidSpecError as e:
                broken.append(BrokenSpec(_declared_name(path), path, "; ".join(e.problems)))
                continue
            except SpecError as e:
                text = str(e).removeprefix(f"{path}: ")
                broken.append(BrokenSpec(_declared_name(path), path, text))
                continue
            if spec.name in specs:
                again = f"spec {spec.name!r} is already defined in {origin[spec.name]}"
                broken.append(BrokenSpec(spec.name, path, again))
                continue
            specs[spec.name] = spec
            origin[spec.name] = path
    return SpecCatalogue(specs, [_one_line(b) for b in broken])


def _one_line(broken: BrokenSpec) -> BrokenSpec:
    return BrokenSpec(broken.name, broken.file, " ".join(broken.error.split()))


def _declared_name(path: Path) -> str:
    """The `name:` a broken file declares, as far as it can be read; else its stem."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, ValueError):
        return path.stem
    name = data.get("name") if isinstance(data, Mapping) else None
    return name if isinstance(name, str) and name.strip() else path.stem


def builtin_specs() -> dict[str, WorkflowSpec]:
    """The specs shipped in `rebalancer/specs/builtin/`."""
    return load_specs([BUILTIN_DIR])


def available_specs(
    dirs: Iterable[Path | str] = (), accounts: Accounts | None = None
) -> SpecCatalogue:
    """The built-in specs plus those in `dirs` (what `rebalancer start SPEC` chooses from).
    A broken file, or one that defines a name again (built-in or not), is in `.broken`; the
    first definition of a name stays usable."""
    return scan_specs([BUILTIN_DIR, *dirs], accounts)


def list_specs(dirs: Iterable[Path | str] = ()) -> list[tuple[str, str, int]]:
    """For `rebalancer specs list`: (name, description, task count) of the usable built-in
    specs and those in `dirs`, by name (`available_specs(dirs).broken` has the others)."""
    specs = available_specs(dirs)
    return [(name, specs[name].description, len(specs[name].tasks)) for name in sorted(specs)]


# --- helpers ------------------------------------------------------------------------------------


def _subject(data: object) -> str:
    name = data.get("name") if isinstance(data, Mapping) else None
    return f"spec {name!r}" if isinstance(name, str) else "spec"


def _raw_params(raw: object) -> dict[str, str | None]:
    """Declared param names with their types, as far as readable."""
    if not isinstance(raw, Mapping):
        return {}
    types = get_args(ParamType)
    out: dict[str, str | None] = {}
    for name, decl in raw.items():
        kind = decl.get("type") if isinstance(decl, Mapping) else None
        out[str(name)] = kind if kind in types else None
    return out


def _raw_result(raw: object) -> dict[str, Any]:
    return {str(key): value for key, value in raw.items()} if isinstance(raw, Mapping) else {}


def _draft(raw: object) -> TaskDraft:
    if not isinstance(raw, Mapping):
        return TaskDraft(None, None, None)
    name, kind, config = raw.get("name"), raw.get("kind"), raw.get("config")
    return TaskDraft(
        name.lower() if isinstance(name, str) else None,
        TaskKind(kind) if isinstance(kind, str) and kind in set(TaskKind) else None,
        config if isinstance(config, Mapping) else None,
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Hashable, Any]:
    loader.flatten_mapping(node)  # resolve `<<` merge keys first, as SafeLoader does
    mapping: dict[Hashable, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark
            )
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml_error_text(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    return " ".join(str(error).split())


__all__ = [
    "BUILTIN_DIR",
    "BrokenSpec",
    "SpecCatalogue",
    "available_specs",
    "builtin_specs",
    "list_specs",
    "load_spec_file",
    "load_specs",
    "scan_specs",
    "spec_from_data",
    "validate_file",
]
