"""`rebalancer serve` (the service) and `rebalancer demo` (the built-in path, simulated)."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import TYPE_CHECKING

from rebalancer import embedded
from rebalancer.cli.common import EXIT_CHECK_FAILED, EXIT_OK
from rebalancer.errors import ComponentFailedError
from rebalancer.settings import Settings

if TYPE_CHECKING:
    from rebalancer.web import Bind


def worker_serve(args: argparse.Namespace, settings: Settings) -> int:
    from rebalancer.logs import configure
    from rebalancer.web import listen, parse_bind
    from rebalancer.web.operator import operator_token

    # Refused before anything starts, logging included: a non-loopback bind without the
    # opt-in, a bad token, an address in use (bound here, before the embedded servers,
    # migrations or any component).
    http = None if args.http is None else parse_bind(args.http,
                                                     allow_remote=args.http_allow_remote)
    if http is None:
        configure(args.log_format or settings.log_format)
        return _serve(args, settings, None, None)
    operator_token(settings)
    listener = listen(http)
    configure(args.log_format or settings.log_format)
    try:
        return _serve(args, settings, http, listener)
    finally:
        listener.close()


def _serve(args: argparse.Namespace, settings: Settings, http: Bind | None,
           listener: socket.socket | None) -> int:
    import logging

    from events.migrations import migrate
    from rebalancer.service import serve

    # The pool warns on every reconnect attempt; the store says an outage once (events/store.py).
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    if settings.database_url and not settings.nats_url:
        # A worker-only deployment: money moves, nothing is relayed or served over NATS.
        logging.getLogger("rebalancer").warning(
            "REBALANCER_NATS_URL is not set: running without relay, command API and alerts")
        database_url, nats_url = settings.database_url, None
    else:
        database_url, nats_url = embedded.ensure_urls(settings)
    # As the owner role: the service's own may not change the schema.
    asyncio.run(migrate(embedded.migrate_url(settings), connect_timeout=settings.connect_timeout))
    try:
        asyncio.run(serve(settings, database_url, nats_url, tick=args.tick, http=http,
                          listener=listener))
    except ComponentFailedError as e:
        # The log above has the traceback; the last line says why the service is down.
        print(f"rebalancer: serve: {e}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK


def run_demo_command(args: argparse.Namespace, settings: Settings) -> int:
    from rebalancer.demo import run_demo
    from rebalancer.web import listen, parse_bind

    http = None if args.http is None else parse_bind(args.http)
    # Bound first, as `serve` does: a port in use is one line before anything has started.
    listener = None if http is None else listen(http)
    try:
        database_url, nats_url = (
            (settings.database_url, settings.nats_url)
            if settings.database_url and settings.nats_url
            else embedded.ensure_urls(settings)
        )
        return asyncio.run(run_demo(settings, database_url, nats_url, amount=args.amount,
                                    as_json=args.json,
                                    migrate_url=embedded.migrate_url(settings), http=http,
                                    listener=listener))
    finally:
        if listener is not None:
            listener.close()
