"""The Docker files: infra/docker-compose.yml as compose parses it, and what it and the
Dockerfile must say (no secret in them, migrate before serve, the service not as root).

`docker compose config` only parses and interpolates: it needs no Docker engine. Where the
compose plugin is missing, the Debian `docker-compose` (v1.29) parses the file instead, less
its top-level `name:` (which v1 predates). `make test` installs the Debian one where neither is
there; a bare pytest without either skips those tests, and the structural ones below still run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SECRETS = ("REBALANCER_POSTGRES_PASSWORD", "REBALANCER_OWNER_PASSWORD",
           "REBALANCER_SERVICE_PASSWORD", "REBALANCER_NATS_OPERATOR_PASSWORD",
           "REBALANCER_NATS_SUBSCRIBER_PASSWORD")
DUMMY = {name: f"dummy{n}" for n, name in enumerate(SECRETS)}


def compose_cli(tmp_path: Path) -> list[str]:
    """The command that runs `config` on the compose file, or skip saying what is missing."""
    docker = shutil.which("docker")
    if docker is not None and subprocess.run(
            [docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose", "-f", str(COMPOSE)]
    v1 = shutil.which("docker-compose")
    if v1 is not None:
        copy = tmp_path / "docker-compose.yml"
        copy.write_text(re.sub(r"(?m)^name: .*\n", "", COMPOSE.read_text()))
        return [v1, "--project-directory", str(INFRA), "-f", str(copy)]
    pytest.skip("neither the docker compose plugin nor docker-compose is installed")


def run_config(cli: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    return subprocess.run([*cli, "config"], env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def test_compose_config_parses_the_file_with_every_password_given(tmp_path: Path) -> None:
    done = run_config(compose_cli(tmp_path), DUMMY)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    services = config["services"]
    assert set(services) == {"postgres", "nats", "migrate", "serve"}
    migrate_env, serve_env = services["migrate"]["environment"], services["serve"]["environment"]
    owner, service = DUMMY["REBALANCER_OWNER_PASSWORD"], DUMMY["REBALANCER_SERVICE_PASSWORD"]
    assert migrate_env["REBALANCER_MIGRATE_DATABASE_URL"] == (
        f"postgresql://rebalancer_owner:{owner}@postgres:5432/rebalancer")
    assert serve_env["REBALANCER_DATABASE_URL"] == (
        f"postgresql://rebalancer_service:{service}@postgres:5432/rebalancer")
    operator = DUMMY["REBALANCER_NATS_OPERATOR_PASSWORD"]
    assert serve_env["REBALANCER_NATS_URL"] == f"nats://operator:{operator}@nats:4222"
    assert services["serve"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully")
    # The dashboard and probes: published on the host's loopback only, healthy when ready.
    assert "/readyz" in " ".join(services["serve"]["healthcheck"]["test"])
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip = port["host_ip"] if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", (name, port)
    # Every bind mount and the build context resolve to files of this repository.
    for name in ("postgres", "nats"):
        for volume in services[name]["volumes"]:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).is_file(), source
    for name in ("migrate", "serve"):
        build = services[name]["build"]
        assert (Path(build["context"]) / build.get("dockerfile", "Dockerfile")).is_file()


@pytest.mark.parametrize("missing", SECRETS)
def test_compose_refuses_without_a_password(tmp_path: Path, missing: str) -> None:
    done = run_config(compose_cli(tmp_path),
                      {k: v for k, v in DUMMY.items() if k != missing})
    assert done.returncode != 0
    assert missing in done.stderr


def test_no_secret_is_written_into_the_compose_file() -> None:
    text = COMPOSE.read_text()
    raw: dict[str, Any] = yaml.safe_load(text)
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if "PASSWORD" in key or "@" in value:
                # A password only ever as a mandatory variable: `${VAR:?...}`.
                found = re.findall(r"\$\{(\w+)(:\?|:-|-|\?)?", value)
                assert found and all(op == ":?" for _, op in found), (name, key, value)
    for variable, op in re.findall(r"\$\{(\w+)(:\?|:-|-|\?)?", text):
        if "PASSWORD" in variable:
            assert op == ":?", variable
    assert not re.search(r"password\s*[:=]\s*['\"]?\w", text, re.IGNORECASE)


def test_the_first_start_order_and_mounts_are_in_the_file() -> None:
    raw: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    services = raw["services"]
    assert services["migrate"]["command"] == ["db", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["serve"]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "nats": {"condition": "service_healthy"}}
    assert "./postgres/roles.sh:/docker-entrypoint-initdb.d/10-roles.sh:ro" in (
        services["postgres"]["volumes"])
    assert "./nats/rebalancer.conf:/etc/nats/rebalancer.conf:ro" in services["nats"]["volumes"]
    assert services["nats"]["command"][:2] == ["-c", "/etc/nats/rebalancer.conf"]
    assert "jetstream" in (INFRA / "nats" / "rebalancer.conf").read_text()
    for path in ("postgres/roles.sh", "nats/rebalancer.conf"):
        assert (INFRA / path).is_file(), path
    # The chain key outlives the container.
    assert "rebalancer-home:/var/lib/rebalancer" in services["serve"]["volumes"]


def test_the_dockerfile_installs_the_package_and_runs_serve_unprivileged() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(re.match(r"RUN pip install \.( |$)", line) for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["rebalancer"]' in lines
    assert lines[-1] == 'CMD ["serve"]'
    # The image checks that the installed package carries its migrations.
    assert any("from events.migrations import available" in line for line in lines)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".git" in ignored and ".venv" in ignored
