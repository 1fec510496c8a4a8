"""`rebalancer infra` (the embedded PostgreSQL + NATS) and `rebalancer db migrate`."""

from __future__ import annotations

import argparse
import asyncio
import json

from rebalancer import embedded
from rebalancer.cli.common import EXIT_OK, UsageError
from rebalancer.settings import Settings, chain_key_path


def infra_up(args: argparse.Namespace, settings: Settings) -> int:
    from events.relay.anchors import load_key

    home = settings.home
    was = embedded.status(home)
    info = embedded.up(home, pg_bin=settings.pg_bin)
    # The relay's anchor key, made now so that a backup of the home directory has it.
    load_key(chain_key_path(settings), create=True)
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
        return EXIT_OK
    pg = "already running" if was["postgresql"] else "started"
    nats = "already running" if was["nats"] else "started"
    print(f"PostgreSQL {pg}: {embedded.masked_url(info.database_url)}")
    print(f"  data {info.pg_data_dir}, binaries {info.pg_bin_dir}")
    print(f"NATS {nats}: {info.nats_address} (users operator and subscriber; `infra env`)")
    print(f"  store {info.home / 'nats' / 'store'}")
    print(f"state in {info.home}; `rebalancer infra env` prints the export lines")
    return EXIT_OK


def infra_down(args: argparse.Namespace, settings: Settings) -> int:
    stopped = embedded.down(settings.home)
    print("stopped " + ", ".join(stopped) if stopped else "nothing was running")
    return EXIT_OK


def infra_env(args: argparse.Namespace, settings: Settings) -> int:
    home = settings.home
    info = embedded.load_info(home)
    if info is None:
        raise UsageError(f"no embedded servers under {home.resolve()}; run `rebalancer infra up`")
    running = embedded.status(home)
    if not all(running.values()):
        stopped = " and ".join(name for name, up in running.items() if not up)
        raise UsageError(f"{stopped} not running under {info.home}; run `rebalancer infra up`")
    print(info.exports())
    return EXIT_OK


def infra_status(args: argparse.Namespace, settings: Settings) -> int:
    running = embedded.status(settings.home)
    if args.json:
        print(json.dumps(running))
    else:
        for name, up in running.items():
            print(f"{name}: {'running' if up else 'stopped'}")
    return EXIT_OK


def db_migrate(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here so the rest of the command line works without the migrations module.
    from events.migrations import migrate

    # Only the database is needed: an explicit URL must not start the embedded servers.
    # As the owner role: REBALANCER_MIGRATE_DATABASE_URL, else REBALANCER_DATABASE_URL, else
    # the embedded owner's.
    applied = asyncio.run(migrate(embedded.migrate_url(settings),
                                  connect_timeout=settings.connect_timeout))
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print("up to date")
    return EXIT_OK
