# One command to set up and run the tests, one to set up and run the service. Both install the
# server and dev extras; `pip install .` alone installs only the client.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nfserve-installed

.PHONY: setup test serve demo bench lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[server,dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

serve: $(STAMP)
	$(VENV)/bin/nfserve serve

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[server,bench]"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
