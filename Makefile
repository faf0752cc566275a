# Baton's developer entry points. `make test` alone works on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: setup redis proto test lint bench up demo clean

setup: $(STAMP) redis

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[server,dev]'
	touch $(STAMP)

redis:
	@if command -v redis-server >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing redis-server with apt-get"; \
		(apt-get install -y -qq redis-server >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)) || exit 1; \
	else \
		echo "Baton's tests and local cluster need redis-server on PATH." >&2; \
		echo "Install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)" >&2; \
		echo "or run make setup as root on Debian." >&2; \
		exit 1; \
	fi

proto: $(STAMP)
	$(PY) -m services.common.protogen

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/ruff format --check services tests bench
	$(VENV)/bin/mypy services

bench: setup
	$(PY) -m bench.blobs
	$(PY) -m bench.denoise
	$(PY) -m bench.pipeline
	$(PY) -m bench.interposer
	$(PY) -m bench.cli_start
	$(PY) -m bench.batching --quick
	$(PY) -m bench.forward_cost

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

up: setup
	$(VENV)/bin/baton up

# The main job: the example cooperative pipelines on a local cluster, outputs in ./out.
# With no BATON_MODELS set it builds tiny random models first (no downloads).
demo: setup
	OUT=$(OUT) BATON=$(VENV)/bin/baton examples/demo.sh
