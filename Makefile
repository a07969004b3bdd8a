# Quick start: `make run` (daemon with embedded defaults) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test bench bench-overhead clean

$(BIN)/carbond: pyproject.toml
	scripts/setup-venv.sh $(PYTHON) $(VENV)
	@touch $@

run: $(BIN)/carbond
	$(BIN)/carbond run $(ARGS)

test: $(BIN)/carbond
	scripts/test-deps.sh
	$(BIN)/ruff check carbond tests benchmarks
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(BIN)/carbond
	$(BIN)/python benchmarks/tick.py

# As root: real cgroups and processes; see benchmarks/README.md. ARGS="--matrix", "--soak 30m".
bench-overhead: $(BIN)/carbond
	scripts/test-deps.sh
	$(BIN)/python benchmarks/overhead.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
