# Two commands do all the set-up: `make run` and `make test` (each installs first).
PYTHON ?= python3
PIP_FLAGS ?=   # e.g. --extra-index-url https://download.pytorch.org/whl/cpu where pip has no CPU torch
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1
export PYTHONUNBUFFERED = 1

.PHONY: install run test test-fast browser bench clean

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

## the whole test suite (CPU; includes the end-to-end server, worker and browser tests)
test: install browser
	$(BIN)/python -m pytest

## everything but the slow and end-to-end tests
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not e2e"

bench: install
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache
