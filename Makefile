PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test test-slow demo tb lint bench clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[test]'

test:
	$(BIN)/python -m pytest -q

test-slow:
	$(BIN)/python -m pytest -q -m slow

demo:
	$(BIN)/python -m agingnet.train

tb:
	$(BIN)/tensorboard --logdir outputs --bind_all

lint:
	$(BIN)/ruff check agingnet tests

bench:
	$(BIN)/python -m agingnet.bench

clean:
	rm -rf outputs/*/ .pytest_cache
