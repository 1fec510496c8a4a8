"""`python -m tests.soak.run` (`make soak`): the soak on fresh embedded servers of its own.

PostgreSQL and NATS (JetStream, the operator and subscriber users) are started under
SOAK_HOME (default .rebalancer-soak, wiped first so the JetStream copy holds this run only),
migrated as `rebalancer db migrate` would, and stopped at the end (the files stay for a
look). The report is printed and written as JSON to SOAK_REPORT (default
SOAK_HOME/report.json); the exit status is 1 when report.problems finds anything.
Sizes: SOAK_WORKFLOWS (50), SOAK_KILLS (200); the rest in soak.Knobs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

from events.migrations import migrate
from rebalancer import embedded
from tests.soak.report import problems, text
from tests.soak.serve import ROOT
from tests.soak.soak import Knobs, soak


def main() -> int:
    began = time.monotonic()
    home = Path(os.environ.get("SOAK_HOME", ROOT / ".rebalancer-soak")).resolve()
    report_path = Path(os.environ.get("SOAK_REPORT", home / "report.json"))
    knobs = Knobs.from_env()
    embedded.down(home)
    shutil.rmtree(home, ignore_errors=True)
    print(f"soak: servers under {home}; {knobs.workflows} workflows, {knobs.kills} kills",
          flush=True)
    info = embedded.up(home)
    try:
        asyncio.run(migrate(info.migrate_database_url))
        report = asyncio.run(soak(knobs, info.database_url, info.nats_url,
                                  home / "chain.key", home))
    finally:
        embedded.down(home)
    report["wall_seconds"] = round(time.monotonic() - began, 1)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(text(report))
    print(f"report: {report_path}")
    return 1 if problems(report) else 0


if __name__ == "__main__":
    sys.exit(main())
