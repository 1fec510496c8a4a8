"""Three nats-server processes on loopback forming one JetStream cluster, with the rebalancer's
users and permissions on every node (rebalancer/embedded/permissions.py)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from rebalancer.embedded.permissions import NATS_OPERATOR, NATS_SUBSCRIBER, nats_authorization
from tests.support.nats_server import NatsServer, free_port

CLUSTER_NAME = "rebalancer"


class NatsCluster:
    """`size` nodes named n1..nN, each with its own client port, route port and file store.

    `url(user)` is the seed list a client is configured with: every node's URL, comma-separated,
    the user's credentials in the first (events.relay.servers)."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.passwords = {NATS_OPERATOR: secrets.token_hex(12),
                          NATS_SUBSCRIBER: secrets.token_hex(12)}
        authorization = nats_authorization(
            {user: json.dumps(password) for user, password in self.passwords.items()})
        route_ports = [free_port() for _ in range(size)]
        self.nodes: list[NatsServer] = []
        for n, route_port in enumerate(route_ports, start=1):
            store = directory / f"n{n}" / "store"
            store.mkdir(parents=True)
            routes = [f"nats://127.0.0.1:{p}" for p in route_ports if p != route_port]
            conf = directory / f"n{n}" / "nats.conf"
            conf.write_text("\n".join([
                f"server_name: n{n}",
                f"jetstream {{ store_dir: {json.dumps(str(store))} }}",
                "cluster {",
                f"  name: {CLUSTER_NAME}",
                f"  listen: \"127.0.0.1:{route_port}\"",
                f"  routes: {json.dumps(routes)}",
                "}",
                authorization,
            ]))
            self.nodes.append(NatsServer("-c", str(conf)))

    def url(self, user: str, *, first: int = 0) -> str:
        """Every node's URL, starting at node index `first`, as `user`."""
        order = self.nodes[first:] + self.nodes[:first]
        hosts = [node.url.removeprefix("nats://") for node in order]
        head = f"nats://{user}:{self.passwords[user]}@{hosts[0]}"
        return ",".join([head, *(f"nats://{host}" for host in hosts[1:])])

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
