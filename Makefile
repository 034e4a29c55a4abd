# The two commands of the README. `make demo` runs the main job; `make test` installs and runs the tests.
PY ?= python3
PROJECT ?= configs/demo/dlt.yml
EVENTS ?= 2000

.PHONY: install install-test demo test

install:
	$(PY) -m pip install -q -e '.[server]'

# the tests start a real PostgreSQL (initdb/pg_ctl from Debian's postgresql package) and moto's S3 server,
# and validate docker-compose.yml with Debian's docker-compose (no container engine needed)
install-test:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	fi
	@if ! command -v docker-compose >/dev/null 2>&1; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose; \
	fi
	$(PY) -m pip install -q -e '.[test]'

demo: install
	$(PY) -m flight_server.cli demo --project $(PROJECT) --events $(EVENTS)
	$(PY) -m flight_server.cli serve --project $(PROJECT)

test: install-test
	$(PY) -m pytest
