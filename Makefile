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

# three worker processes (pytest-xdist) on two cores, each test file on one worker so that its module
# fixtures (a trained bundle, a retrain history, servers) are built once: many tests wait on servers and
# child processes (the suite keeps 1.7 of 2 cores busy with three workers)
test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 3 --dist loadfile

# development aid: every module's tests except those marked slow (flows, servers, benchmarks, child
# training runs, simulations, statistical training checks), spread test by test over three workers
# (their module fixtures are cheap); 74 s on two cores. `make test` stays the full suite.
test-fast: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 3 --dist load -m "not slow"

clean-venv:
	rm -rf $(VENV)
