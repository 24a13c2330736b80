# Two commands do all the set-up: `make run` and `make test` (each installs first).
PYTHON ?= python3
PIP_FLAGS ?=   # e.g. --extra-index-url https://download.pytorch.org/whl/cpu where pip has no CPU torch
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1
export PYTHONUNBUFFERED = 1

.PHONY: install run test test-fast browser postgres bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_FLAGS) -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## the whole pipeline on the bundled sample data: offline, CPU, a few minutes
run: install
	$(BIN)/homer run --profile sample

## Debian's Chromium and ChromeDriver for the browser test (needs root or sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

## PostgreSQL for the cluster tests (tests/postgres.py): nothing to do where one answers at
## HOMER_TEST_POSTGRES; else Debian's postgresql (needs root or sudo) and a cluster `homer` with
## trust auth on that local port. Idempotent. DRY_RUN=1 prints the commands instead of running them.
HOMER_TEST_POSTGRES ?= postgresql://postgres@127.0.0.1:5432/postgres
export HOMER_TEST_POSTGRES
# where Debian puts each version's server (set it elsewhere to dry-run the install branch)
POSTGRES_LIB ?= /usr/lib/postgresql
POSTGRES_ANSWERS = $(BIN)/python -c 'import sys; from tests.postgres import postgres_problem as p; w = p(); print(w or "PostgreSQL answers at $(HOMER_TEST_POSTGRES)"); sys.exit(1 if w else 0)'
postgres: install
	@$(POSTGRES_ANSWERS) && exit 0; \
	set -e; \
	run() { echo "+ $$*"; [ -n "$(DRY_RUN)" ] || "$$@"; }; \
	set -- $$($(BIN)/python -c 'import os, urllib.parse as u; a = u.urlsplit(os.environ["HOMER_TEST_POSTGRES"]); print(a.hostname or "127.0.0.1", a.port or 5432)'); \
	case "$$1" in 127.0.0.1|localhost) ;; *) echo "$$1 is another machine: start PostgreSQL there, or point HOMER_TEST_POSTGRES here" >&2; exit 1;; esac; \
	port=$$2; SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); fresh=; \
	if ! ls $(POSTGRES_LIB)/*/bin/postgres >/dev/null 2>&1; then \
	  run $$SUDO apt-get update -qq; \
	  run $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; fresh=1; \
	fi; \
	version=$$(ls $(POSTGRES_LIB) 2>/dev/null | sort -V | tail -n 1); version=$${version:-VERSION}; \
	if [ -n "$$fresh" ] && { [ -n "$(DRY_RUN)" ] || pg_lsclusters -h | grep -q "^$$version main "; }; then \
	  run $$SUDO pg_dropcluster --stop $$version main; \
	fi; \
	if pg_lsclusters -h 2>/dev/null | grep -q "^$$version homer "; then \
	  run $$SUDO pg_ctlcluster $$version homer start || true; \
	else \
	  run $$SUDO pg_createcluster --port $$port --start $$version homer -- --auth=trust; \
	fi; \
	[ -n "$(DRY_RUN)" ] || $(POSTGRES_ANSWERS)

## the whole test suite (CPU; includes the end-to-end server, worker, browser and cluster tests)
test: install browser postgres
	$(BIN)/python -m pytest

## everything but the slow and end-to-end tests
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not e2e"

bench: install
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache
