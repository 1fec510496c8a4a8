"""Reading a file that holds a secret (a key, a webhook URL, the operator token): one check for
all of them, so every such file is refused the same way when others could read or change it."""

from __future__ import annotations

import stat
from pathlib import Path

from rebalancer.errors import SpecError

# Any permission for group or others: read leaks the secret, write lets someone swap it.
OPEN_BITS = stat.S_IRWXG | stat.S_IRWXO


def read_secret_file(path: Path, name: str, *, where: str = "") -> str:
    """The file's text, stripped (maybe empty: the caller says what that means). Raises
    SpecError for a file that cannot be read or whose mode lets group or others in, naming
    `where` (e.g. `account x: `), `name` (e.g. `api_key_file`) and the path, never the text."""
    try:
        mode = path.stat().st_mode
        if mode & OPEN_BITS:
            raise SpecError(f"{where}{name} {path} is readable or writable by others (mode"
                            f" {stat.S_IMODE(mode):04o}); chmod 600 {path}")
        return path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise SpecError(f"{where}cannot read {name} {path}: {e.strerror or type(e).__name__}"
                        ) from None
    except UnicodeDecodeError:
        raise SpecError(f"{where}cannot read {name} {path}: not UTF-8 text") from None
