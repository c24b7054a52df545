# Payper's one entry point for people and CI. `make demo` runs the main job on the local
# cluster, `make test` runs every test tier; both set up what they need first.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PAYPER_DEV := $(BIN)/payper-dev
PYTEST := $(BIN)/python -m pytest
CLUSTER_DIR ?= build/cluster
POD_CIDR ?= 127.1.0.0/16
CRDS_DIRS ?= crds charts/payper/crds
DASHBOARDS_DIR ?= charts/payper/dashboards

.PHONY: help venv binaries cluster-up cluster-down cluster-status crds crds-check \
        dashboards dashboards-check docs docs-check chart-schema chart-schema-check \
        generated generated-check \
        lint format test test-deps test-unit test-integration demo images clean \
        bench-deps node-deps node-binaries node-images node-up node-down node-status test-node \
        focus-validator stripe-mock

help:
	@echo "make demo         - the main job: Payper end to end on a local cluster"
	@echo "make test         - every test tier (unit, then integration on a local cluster)"
	@echo "make lint         - ruff (lint + format check), mypy --strict, import contracts"
	@echo "make bench-deps   - what bench/ needs: Debian packages (nginx, wrk), kept servers"
	@echo "make cluster-up   - start the local cluster (CLUSTER_DIR=$(CLUSTER_DIR))"
	@echo "make cluster-down - stop it"
	@echo "make crds         - regenerate crds/ from payper.api; make crds-check fails on drift"

# Debian packages the test tiers and the benchmarks need: installed when missing (as
# root), otherwise a stop at once with the exact command to run.
test-deps:
	.ci/debian-deps .ci/test-packages

bench-deps: venv
	.ci/debian-deps bench/debian-packages
	$(BIN)/python -m pip install --quiet -e '.[bench]'

# The real node (kubelet, containerd, runc, CNI, kube-proxy, CoreDNS, a loopback
# registry): its Debian packages, its binaries (built once, cached beside the cluster's)
# and its test images (the payper image and the stand-in model server).
node-deps:
	.ci/debian-deps .ci/node-packages

node-binaries: binaries node-deps
	$(PAYPER_DEV) node build

node-images: node-deps images
	.ci/build-standin-image

# FOCUS files are checked with the FinOps Foundation's focus-validator, in a virtualenv of
# its own (its pins clash with ours), cached outside the repo per constraints file.
FOCUS_VALIDATOR_VERSION := 1.0.0
FOCUS_VALIDATOR_DIR ?= $(HOME)/.cache/payper/focus-validator-$(FOCUS_VALIDATOR_VERSION)-$(shell sha256sum tests/focus-validator.constraints | cut -c1-12)
export PAYPER_FOCUS_VALIDATOR := $(FOCUS_VALIDATOR_DIR)/bin/focus-validator
focus-validator: $(FOCUS_VALIDATOR_DIR)/.installed
$(FOCUS_VALIDATOR_DIR)/.installed: tests/focus-validator.constraints
	rm -rf $(FOCUS_VALIDATOR_DIR)
	$(PYTHON) -m venv $(FOCUS_VALIDATOR_DIR)
	$(FOCUS_VALIDATOR_DIR)/bin/python -m pip install --quiet \
	  -c tests/focus-validator.constraints focus-validator==$(FOCUS_VALIDATOR_VERSION)
	touch $@

# Stripe's own mock server (it validates every request against Stripe's API definition),
# built from the Go module proxy once, cached outside the repo per version.
STRIPE_MOCK_VERSION := v0.203.0
STRIPE_MOCK_DIR ?= $(HOME)/.cache/payper/bin/stripe-mock-$(STRIPE_MOCK_VERSION)
export PAYPER_STRIPE_MOCK := $(STRIPE_MOCK_DIR)/stripe-mock
stripe-mock: $(PAYPER_STRIPE_MOCK)
$(PAYPER_STRIPE_MOCK):
	GOBIN=$(STRIPE_MOCK_DIR) go install \
	  -ldflags "-X main.version=$(STRIPE_MOCK_VERSION)" \
	  github.com/stripe/stripe-mock@$(STRIPE_MOCK_VERSION)

# The virtual environment, rebuilt when pyproject.toml changes.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml devtools/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e ./devtools
	touch $@

# Control-plane binaries, built once from the Go module proxy into ~/.cache/payper.
binaries: venv
	$(PAYPER_DEV) cluster build

cluster-up: binaries
	$(PAYPER_DEV) cluster up --dir $(CLUSTER_DIR) --pod-cidr $(POD_CIDR) --crds crds

cluster-down: venv
	$(PAYPER_DEV) cluster down --dir $(CLUSTER_DIR)

cluster-status: venv
	$(PAYPER_DEV) cluster status --dir $(CLUSTER_DIR)

# The real node in the cluster of CLUSTER_DIR (started with `cluster up --real-node`, or
# `make node-up`, which starts both), with the test images in its registry.
VERSION = $(shell $(PYTHON) -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
node-up: node-binaries node-images
	$(PAYPER_DEV) cluster up --dir $(CLUSTER_DIR) --pod-cidr $(POD_CIDR) --crds crds --real-node
	$(PAYPER_DEV) node up --dir $(CLUSTER_DIR) \
	  --image build/images/payper-$(VERSION).tar=payper/payper:$(VERSION) \
	  --image build/images/payper-model-server-$(VERSION).tar=payper/model-server:$(VERSION)

node-down: venv
	$(PAYPER_DEV) node down --dir $(CLUSTER_DIR)

node-status: venv
	$(PAYPER_DEV) node status --dir $(CLUSTER_DIR)

# Generated files: the CRDs (top level and the chart's copy), the Grafana dashboards and
# the configuration reference. Each has a -check twin that fails on drift.
crds: venv
	@for dir in $(CRDS_DIRS); do $(PAYPER_DEV) crds --dir $$dir || exit 1; done

crds-check: venv
	@for dir in $(CRDS_DIRS); do $(PAYPER_DEV) crds --check --dir $$dir || exit 1; done

dashboards: venv
	$(PAYPER_DEV) dashboards --dir $(DASHBOARDS_DIR)

dashboards-check: venv
	$(PAYPER_DEV) dashboards --check --dir $(DASHBOARDS_DIR)

docs: venv
	$(PAYPER_DEV) config-reference --out docs/configuration.md

docs-check: venv
	$(PAYPER_DEV) config-reference --check --out docs/configuration.md

# The chart's values.schema.json: the operator's part generated from its models.
chart-schema: venv
	$(PAYPER_DEV) chart-schema --chart charts/payper

chart-schema-check: venv
	$(PAYPER_DEV) chart-schema --check --chart charts/payper

generated: crds dashboards docs chart-schema
generated-check: crds-check dashboards-check docs-check chart-schema-check

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# pytest exits 5 when it collected nothing: a tier that silently tests nothing is a failure.
define run_tier
	@set +e; $(PYTEST) $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "FAILED: pytest collected no tests in $(1) (exit 5)"; fi; \
	exit $$rc
endef

test-unit: binaries
	$(call run_tier,tests/unit)

test-integration: binaries focus-validator stripe-mock
	$(call run_tier,tests/integration)

# The real-node tier (root, containerd, runc; see tests/node/conftest.py), last in
# `make test`. PAYPER_SKIP_NODE_TESTS=1 skips it, with a warning (its builds too).
ifeq ($(PAYPER_SKIP_NODE_TESTS),)
test-node: node-binaries node-images
	$(call run_tier,tests/node)
else
test-node: venv
	$(call run_tier,tests/node)
endif

test: test-deps lint generated-check test-unit test-integration test-node

clean:
	-$(PAYPER_DEV) cluster down --dir $(CLUSTER_DIR)
	rm -rf build .mypy_cache .ruff_cache .pytest_cache

# Container image (buildah, no daemon): see .ci/build-images.
images:
	.ci/build-images

# Pin the image's Python dependencies (hash-checked installs); refresh deliberately.
lock: venv
	$(BIN)/pip-compile --quiet --strip-extras --generate-hashes --allow-unsafe \
	  --output-file=requirements.lock pyproject.toml

# The main job: Payper end to end on a local cluster, narrated (ARGS=--keep leaves it up).
demo: binaries
	$(PAYPER_DEV) demo $(ARGS)

demo-down: venv
	$(PAYPER_DEV) demo --down
