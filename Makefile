# The two commands of the README. `make demo` installs and runs the demo; `make test` installs and runs the tests.
# Both install from the committed lock (uv.lock) into the project's own virtual environment (.venv/), never
# into the system interpreter; a second run reuses it and only syncs what the lock changed.
PYTHON ?= python3
VENV ?= .venv
PROJECT ?= configs/demo/dlt.yml
EVENTS ?= 2000
# the same version as the `dev` dependency group in pyproject.toml (a test checks they agree)
UV_VERSION := 0.13.9

UV := $(VENV)/bin/uv
PY := $(VENV)/bin/python
# uv: this environment, the interpreter already in it, never a downloaded one, the lock as committed
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never

.PHONY: check install install-test bench demo test lock

# the bootstrap: a virtual environment with uv in it (uv then manages everything else from the lock)
$(UV):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)

install: $(UV)
	$(UV) sync --locked --extra server

# the tests start a real PostgreSQL (initdb/pg_ctl from Debian's postgresql package) and moto's S3 server,
# and validate docker-compose.yml with Debian's docker-compose (no container engine needed)
install-test: $(UV)
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	fi
	@if ! command -v docker-compose >/dev/null 2>&1; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose; \
	fi
	$(UV) sync --locked --extra test --extra cli

# the benchmarks' environment: the test extra plus the peers they compare against (roapi); see benchmarks/README.md
bench: install-test
	$(UV) sync --locked --extra test --extra cli --extra bench

demo: install
	$(PY) -m flight_server.cli demo --project $(PROJECT) --events $(EVENTS)
	$(PY) -m flight_server.cli serve --project $(PROJECT)

# two workers (pytest-xdist): a test mostly waits on a server, PostgreSQL or a load in another process, so a
# second worker fills the idle core; tests sharing a module fixture stay on one worker (tests/conftest.py)
PYTEST_WORKERS ?= 2
test: check
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

# lint (ruff) and types (mypy, strict on domain/ and storage/), configured in pyproject.toml; `make test`
# runs it first, so CI fails on either
check: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# after changing a dependency in pyproject.toml: re-resolve and write uv.lock (commit both)
lock: $(UV)
	$(UV) lock
