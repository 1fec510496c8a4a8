"""The DBOS Transact side of bench_engine: 5-step workflows, each step one small insert.

Runs in its own environment (.venv-bench-dbos, `pip install dbos`), never the product's, as
`python tests/bench/dbos_side.py SYSTEM_DB_URL APP_DB_URL SEQUENTIAL CONCURRENT` and prints
one JSON object: workflows/s sequential (start -> done, one at a time) and with CONCURRENT at
once. It imports nothing from this repository, so DBOS stays out of the product's imports.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import psycopg
from dbos import DBOS, DBOSConfig

STEPS = 5
_local = threading.local()
APP_URL = ""


def _conn() -> psycopg.Connection[Any]:
    # One autocommit connection per DBOS worker thread: a step is one insert, nothing more.
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = psycopg.connect(APP_URL, autocommit=True)
    return conn


@DBOS.step()
def insert_step(workflow: int, step: int) -> int:
    _conn().execute(
        "insert into dbos_bench_rows (workflow, step) values (%s, %s)", (workflow, step),
        prepare=True,
    )
    return step


@DBOS.workflow()
def five_steps(workflow: int) -> int:
    return sum(insert_step(workflow, step) for step in range(STEPS))


def main() -> int:
    global APP_URL
    system_url, APP_URL, sequential, concurrent = (
        sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    with psycopg.connect(APP_URL, autocommit=True) as conn:
        conn.execute("create table if not exists dbos_bench_rows"
                     " (id bigserial primary key, workflow int, step int)")
    config: DBOSConfig = {"name": "rebalancer-bench", "system_database_url": system_url,
                          "log_level": "WARNING"}
    DBOS(config=config)
    DBOS.launch()
    try:
        for i in range(5):  # warm up the pools and the prepared statements
            DBOS.start_workflow(five_steps, -1 - i).get_result()
        start = time.perf_counter()
        for i in range(sequential):
            DBOS.start_workflow(five_steps, i).get_result()
        seq_rate = sequential / (time.perf_counter() - start)
        start = time.perf_counter()
        handles = [DBOS.start_workflow(five_steps, sequential + i) for i in range(concurrent)]
        for handle in handles:
            handle.get_result()
        con_rate = concurrent / (time.perf_counter() - start)
        with psycopg.connect(APP_URL) as conn:
            row = conn.execute("select count(*) from dbos_bench_rows").fetchone()
        rows = int(row[0]) if row else 0
    finally:
        DBOS.destroy()
    import dbos

    print(json.dumps({
        "version": getattr(dbos, "__version__", None) or _version(),
        "sequential_per_s": seq_rate,
        "concurrent_per_s": con_rate,
        "sequential": sequential,
        "concurrent": concurrent,
        "rows": rows,
    }))
    return 0


def _version() -> str:
    from importlib.metadata import version

    return version("dbos")


if __name__ == "__main__":
    sys.exit(main())
