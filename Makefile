# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/ips: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(BIN)/ips

.PHONY: install demo test lint format
install: $(BIN)/ips

# real MNIST digits for the demo when the shared test data sits beside the checkout
SHARED_MNIST := $(wildcard ../shared/data/mnist.npz)

demo: install
	IPS_MNIST="$${IPS_MNIST:-$(SHARED_MNIST)}" $(BIN)/ips demo

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

format: install
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests
