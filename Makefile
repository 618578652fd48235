# Ephemera's two commands: `make run` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CLUSTER_DIR := $(CURDIR)/.cluster
LINT_PATHS := $(wildcard ephemera tests bench)
export KUBECONFIG_LOCAL := $(CLUSTER_DIR)/kubeconfig

.PHONY: help venv tools manifests postgres soak bench cluster cluster-down lint format test test-fast run run-down clean

help:
	@echo "make run           bring up a local control plane, the operator and the webhook; show a PR becoming an environment"
	@echo "make test          lint, type check and every test (builds and starts what they need)"
	@echo "make cluster       start a local control plane; prints the export KUBECONFIG=... line"
	@echo "make cluster-down  stop it"
	@echo "make lint          ruff and mypy"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

venv: $(STAMP)

# etcd, kube-apiserver, kube-controller-manager, kubectl and helm, built once per version into
# ~/.cache/ephemera (a cold build takes many minutes and prints its progress).
tools:
	@bash hack/build-tools.sh

# deploy/manifests/ephemera.yaml, rendered from the chart (tests fail when it is out of date).
manifests: tools
	@bash hack/render-manifests.sh

cluster: venv tools
	@$(BIN)/python -m ephemera.devtools.controlplane up $(CLUSTER_DIR)

cluster-down: venv
	@$(BIN)/python -m ephemera.devtools.controlplane down $(CLUSTER_DIR)

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

postgres:
	@bash hack/install-postgres.sh

test: lint tools postgres
	$(BIN)/pytest -q -ra

# The long reliability scenarios (100 environments, 10 operator kills, more storms) and their summary.
soak: venv tools postgres
	EPHEMERA_SOAK=1 $(BIN)/pytest -q -ra tests/test_reliability.py

# Benchmarks against a fresh local control plane; each prints a table and writes bench/results/*.json.
# Runs are noisy on a shared machine: the latency benchmarks run REPEAT times, then the median and spread.
REPEAT ?= 3
bench: venv tools
	for i in $$(seq $(REPEAT)); do $(BIN)/python -m bench.webhook_latency || exit 1; done
	for i in $$(seq $(REPEAT)); do $(BIN)/python -m bench.pr_to_ready || exit 1; done
	$(BIN)/python -m bench.app_to_ready
	$(BIN)/python -m bench.footprint
	$(BIN)/python -m bench.summary

run: venv tools
	@$(BIN)/python -m ephemera.devtools.demo up

run-down: venv
	@$(BIN)/python -m ephemera.devtools.demo down

clean: cluster-down
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache .hypothesis
