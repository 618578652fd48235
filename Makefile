# Ephemera's two commands: `make run` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CLUSTER_DIR := $(CURDIR)/.cluster
LINT_PATHS := $(wildcard ephemera devtools tests bench)
export KUBECONFIG_LOCAL := $(CLUSTER_DIR)/kubeconfig

.PHONY: help venv tools manifests chart-readme postgres soak bench cluster cluster-down lint format test run run-down clean lock lock-check

# Each target's line in `make help` is its `## ` comment.
help: ## list every target
	@awk -F ':.*## ' '/^[a-z][a-z-]*:.*## / { printf "make %-13s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

# The virtualenv is installed from the lock (requirements-dev.txt), then Ephemera itself without
# resolving anything again.
$(STAMP): pyproject.toml requirements-dev.txt
	@bash hack/check-prereqs.sh python $(PYTHON)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

venv: $(STAMP) ## the Python virtualenv in .venv/, from the lock file

# pip-compile keeps the pins already in the files and changes only what pyproject.toml asks for.
LOCK_FLAGS := --quiet --strip-extras --no-emit-index-url --no-emit-find-links --annotation-style=line
lock: venv ## write requirements.txt and requirements-dev.txt (the lock) from pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile $(LOCK_FLAGS) -o requirements.txt pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile $(LOCK_FLAGS) --extra dev -o requirements-dev.txt pyproject.toml

# Resolves again into a scratch copy (needs the package index); tests/test_lock.py checks offline.
lock-check: venv ## fail if the lock is not what `make lock` would write
	@tmp=$$(mktemp -d) && cp requirements.txt requirements-dev.txt $$tmp/ && \
	  CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile $(LOCK_FLAGS) -o $$tmp/requirements.txt pyproject.toml && \
	  CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile $(LOCK_FLAGS) --extra dev -o $$tmp/requirements-dev.txt pyproject.toml && \
	  diff -u requirements.txt $$tmp/requirements.txt && diff -u requirements-dev.txt $$tmp/requirements-dev.txt; \
	  rc=$$?; rm -rf $$tmp; [ $$rc -eq 0 ] || { echo "the lock is out of date: run make lock" >&2; exit 1; }

# etcd, kube-apiserver, kube-controller-manager, kubectl and helm, built once per version into
# ~/.cache/ephemera (a cold build takes many minutes and prints its progress), or linked from
# EPHEMERA_TOOLS_DIR or PATH when binaries of the pinned versions are there.
tools: ## build (or find) the control plane's binaries, kwok and helm

	@bash hack/build-tools.sh

# deploy/manifests/ephemera.yaml, rendered from the chart (tests fail when it is out of date).
manifests: tools ## render deploy/manifests/ephemera.yaml from the chart
	@bash hack/render-manifests.sh

# The values table of charts/ephemera/README.md, from values.schema.json (a test fails when it is stale).
chart-readme: venv ## regenerate the values table of charts/ephemera/README.md from the schema
	@$(BIN)/python hack/values-table.py

cluster: venv tools ## start a local control plane; prints the export KUBECONFIG and PATH lines
	@$(BIN)/python -m devtools.controlplane up $(CLUSTER_DIR)

cluster-down: venv ## stop the local control plane
	@$(BIN)/python -m devtools.controlplane down $(CLUSTER_DIR)

lint: venv ## ruff check, ruff format --check, mypy --strict and the import layers (lint-imports)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

format: venv ## ruff format and ruff check --fix
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

postgres: ## install Debian's postgresql package if missing (as root)
	@bash hack/install-postgres.sh

test: lint tools postgres ## lint, type check and every test (builds and starts what they need)
	@bash hack/install-chromium.sh
	$(BIN)/pytest -q -ra

# The long reliability scenarios (100 environments, 10 operator kills, more storms) and their summary.
soak: venv tools postgres ## the long reliability scenarios
	EPHEMERA_SOAK=1 $(BIN)/pytest -q -ra tests/test_reliability.py

# Benchmarks against a fresh local control plane; each prints a table and writes bench/results/*.json.
# Runs are noisy on a shared machine: the latency benchmarks run REPEAT times, then the median and spread.
REPEAT ?= 3
# bench.scaling takes its sizes from BENCH_BURSTS (100,500,1000,2000), BENCH_FOOTPRINT
# (1000,5000,20000) and BENCH_IDLE (330 s), e.g. `make bench BENCH_BURSTS=100,200` for a quick run.
bench: venv tools ## the benchmarks, REPEAT times each (3)
	for i in $$(seq $(REPEAT)); do $(BIN)/python -m bench.webhook_latency || exit 1; done
	for i in $$(seq $(REPEAT)); do $(BIN)/python -m bench.pr_to_ready || exit 1; done
	$(BIN)/python -m bench.app_to_ready
	$(BIN)/python -m bench.footprint
	$(BIN)/python -m bench.scaling
	$(BIN)/python -m bench.summary
	$(BIN)/python -m bench.plots

run: venv tools ## control plane, operator and webhook; a PR becomes an environment
	@$(BIN)/python -m devtools.demo up

run-down: venv ## stop what make run started
	@$(BIN)/python -m devtools.demo down

clean: cluster-down ## stop the cluster and remove .venv and caches
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache .hypothesis
