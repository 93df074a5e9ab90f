# The two commands of the README:  `make demo`  and  `make test`.
# Both create .venv on first use (Debian's python3, so a non-root hub can run it later)
# and install the pinned stack; torch is installed first from the CPU wheel (TRAPS.md).
PYTHON ?= $(shell command -v /usr/bin/python3 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-down test test-fast lint install stubs errors bench clean fab-hash

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,dp]'  # dp (OpenDP): in dev already; the tests need it
	$(PY) -m pip install -q --no-deps --ignore-requires-python 'helm-sdkpy==0.1.32' 'cffi>=1.15'
	@touch $(STAMP)

demo: install
	$(VENV)/bin/bulle demo up

demo-down:
	$(VENV)/bin/bulle demo down

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The unit tier: parse, plan, compile, merge and the guard rails on plain data (seconds).
test-fast: install
	$(PY) -m pytest -q -m unit tests/unit tests/test_architecture.py

lint: install
	$(PY) -m ruff check .

# Release hash of the DP-training Flower app: nodes run only this FAB (tests check drift).
fab-hash: install
	$(PY) -m bulle_flower._fab > bulle_flower/fab.sha256

stubs: install
	$(PY) -m federation.proto._codegen

# The SDK's hints and docs/errors.md, from the error-code catalogue (federation/_errors.py).
errors: install
	$(PY) -m federation._errordocs

bench: install
	$(PY) benchmarks/bench_federated_sql.py

clean:
	-$(VENV)/bin/bulle demo down
	rm -rf $(VENV) .bulle-demo
