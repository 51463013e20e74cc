# kvtier developer entry points. Every target first makes sure .venv is set up (fast when it is).
VENV := .venv
PYTHON := $(VENV)/bin/python

.PHONY: bootstrap demo test unit

bootstrap:
	scripts/bootstrap.sh

# vLLM alone vs vLLM + kvtier on a multi-user chat with SmolLM2-135M (a few minutes).
demo: bootstrap
	$(VENV)/bin/kvtier demo

# Everything, the end-to-end tests included (they start vLLM engines: several minutes).
test: bootstrap
	scripts/bootstrap.sh --servers
	$(PYTHON) -m pytest -q tests

# Unit tests only (fast, no engine).
unit: bootstrap
	$(PYTHON) -m pytest -q tests/unit
