# Two entry points on a fresh machine: `make demo` and `make test` (both create .venv first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench train-mini clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_dvd.py

train-mini: $(STAMP)
	$(BIN)/internvl35 train configs/mini.yaml --fresh
	$(BIN)/python -m internvl35.train.publish runs/mini/checkpoint src/internvl35/assets/mini

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
