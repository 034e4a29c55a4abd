# The two commands of the README. `make demo` runs the main job; `make test` installs and runs the tests.
PY ?= python3
PROJECT ?= configs/demo/dlt.yml
EVENTS ?= 2000

.PHONY: install install-test demo test

install:
	$(PY) -m pip install -q -e '.[server]'

install-test:
	$(PY) -m pip install -q -e '.[test]'

demo: install
	flight-share demo --project $(PROJECT) --events $(EVENTS)
	flight-share serve --project $(PROJECT)

test: install-test
	$(PY) -m pytest
