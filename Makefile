# Two commands a new user needs: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned here (not in pyproject) to the builds this machine serves from disk
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast lint venv clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[demo,dev]'
	touch $@

venv: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/stage1 demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .

# two worker processes (pytest-xdist), each test file on one worker so that its module fixtures (a
# trained bundle, a retrain history, servers) are built once: most tests wait on servers and child
# processes, and one process left a core idle
test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# development aid: every module's tests except those marked slow (flows, servers, benchmarks, child
# training runs, simulations, statistical training checks); about a minute. `make test` stays the full suite.
test-fast: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
