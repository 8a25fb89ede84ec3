# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
export AMALGAM_HOME ?= $(CURDIR)/.amalgam
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: pip takes the local CPU wheel.
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

# Build the zoo (cached), merge its experts with configs/demo.yaml, evaluate base, experts
# and the merge on every zoo task, print the table.
demo: install
	@ZOO=$$($(BIN)/amalgam zoo build | tail -n 1) && export ZOO && \
	$(BIN)/amalgam merge configs/demo.yaml --output $(AMALGAM_HOME)/demo/merged --overwrite && \
	$(BIN)/amalgam evaluate --tasks-dir $$ZOO/tasks --limit 100 \
		$$ZOO/base $$ZOO/experts/* $(AMALGAM_HOME)/demo/merged

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q -ra
