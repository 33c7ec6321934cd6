# agentrun: one machine, two commands: `make run` (the stack) and `make test` (the tests).
# Everything installs from this repository's own files into .venv and node_modules.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BUF := node_modules/.bin/buf
# buf for the contract checks, and the packages of the Node.js example (an npm workspace).
NODE_INSTALLED := node_modules/.installed

.PHONY: setup run test check lint typecheck proto proto-check proto-lint proto-breaking bench bench-smoke soak clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

$(NODE_INSTALLED): package.json package-lock.json examples/node/package.json
	npm install --no-audit --no-fund --silent
	touch $(NODE_INSTALLED)

setup: $(INSTALLED) $(NODE_INSTALLED)

## The whole stack on this machine: nats-server, executor, gateway on 127.0.0.1:50051, demo agents.
run: setup
	$(BIN)/agentrun up

## The tests (PostgreSQL: AGENTRUN_TEST_POSTGRES_URL, or a throwaway server the tests start),
## in TEST_WORKERS processes: most tests wait on the servers they start, not on the CPU.
TEST_WORKERS ?= 4
test: setup
	$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal

## Everything CI checks besides the tests.
check: lint typecheck proto-check proto-lint proto-breaking

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

## Regenerates agentrun/ from protos/ (the one command that produces generated code).
proto: setup
	PYTHON=$(BIN)/python scripts/generate_protos.sh

## Fails if the generated code is not what protos/ generates.
proto-check: proto
	git diff --exit-code --stat -- agentrun
	test -z "$$(git status --porcelain -- agentrun)"

proto-lint: $(NODE_INSTALLED)
	$(BUF) lint
	$(BUF) format --diff --exit-code

## Fails on a breaking change to protos/ against the previous commit (BASE=<ref> to choose).
proto-breaking: $(NODE_INSTALLED)
	scripts/check_breaking.sh $(BASE)

bench: setup
	$(BIN)/python -m bench.run

bench-smoke: setup
	$(BIN)/python -m bench.run --smoke

## The soak (minutes, not in CI): SOAK_RUNS durable runs against one long-lived stack and a
## PostgreSQL server of its own; does the cost of a run grow with the work done?
SOAK_RUNS ?= 100000
SOAK_WINDOW ?= 10000
soak: setup
	$(BIN)/python -m bench.soak --runs $(SOAK_RUNS) --window $(SOAK_WINDOW) \
		--output bench/results/soak-latest.md

clean:
	rm -rf $(VENV) node_modules .agentrun .mypy_cache .ruff_cache .pytest_cache
