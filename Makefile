# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
export AMALGAM_HOME ?= $(CURDIR)/.amalgam
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PREFECT_HOME ?= $(AMALGAM_HOME)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export MLFLOW_DISABLE_TELEMETRY := true

# checkov pins an old boto3 and ships a module named hcl2 that shadows python-hcl2, so it gets a
# venv of its own (40-80 s to build here); tests/infra runs it from $(CHECKOV).
CHECKOV_VENV ?= .venv-checkov
CHECKOV_VERSION := 3.3.30
export CHECKOV ?= $(abspath $(CHECKOV_VENV))/bin/checkov

.PHONY: install demo test lint checkov

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: pip takes the local CPU wheel.
	$(BIN)/pip install -q -e '.[test,infra]'
	touch $@

install: $(BIN)/.installed

# Build the zoo (cached), then run the whole pipeline on it as a Prefect flow: fetch, align,
# TIES-merge the eight experts (configs/pipeline.yaml), evaluate against base and experts,
# register the merge in MLflow (SQLite under .amalgam/) with the candidate alias.
# The demo builds the tiny zoo (about a minute); `make demo DEMO_PROFILE=full` runs it on the
# quality benchmark's zoo (about ten minutes more).
DEMO_PROFILE ?= tiny
demo: install
	@ZOO=$$($(BIN)/amalgam zoo build --profile $(DEMO_PROFILE) | tail -n 1) && export ZOO && \
	$(BIN)/amalgam run configs/pipeline.yaml --output $(AMALGAM_HOME)/demo/pipeline --overwrite

$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION):
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q checkov==$(CHECKOV_VERSION)
	touch $@

checkov: $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint checkov
	$(BIN)/python -m pytest -q -ra
