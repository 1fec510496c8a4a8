"""What an audit finds: one Finding per thing wrong, of one of the CHECKS kinds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# The kinds of finding, in the order a stream's findings at one version are listed.
CHECKS: Final = (
    "versions", "hash_chain", "schema", "legality", "missing_tail", "jetstream_copy", "anchor",
)


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a stored stream, at an event when it can be placed on one."""

    stream_id: str
    version: int | None
    position: int | None
    check: str  # one of CHECKS
    message: str

    def line(self) -> str:
        """`stream_id vVERSION (position P) [check] message`, leaving out what is unknown."""
        where = self.stream_id
        if self.version is not None:
            where += f" v{self.version}"
        if self.position is not None:
            where += f" (position {self.position})"
        return f"{where} [{self.check}] {self.message}"
