# Two entry points: `make pipeline` (set up + dvc repro) and `make test` (set up + the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# two pytest-xdist workers, a test file per unit of work (see tests/conftest.py)
XDIST := -n 2 --dist loadfile

.PHONY: setup pipeline lint test test-fast bench ui clean-outputs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

pipeline: setup
	. $(BIN)/activate && dvc repro

lint: setup
	$(BIN)/ruff check .

test: setup
	. $(BIN)/activate && python -m pytest -q -rs $(XDIST)

test-fast: setup
	. $(BIN)/activate && python -m pytest -q $(XDIST) -m "not slow"

bench: setup
	. $(BIN)/activate && python -m benchmarks.bench_mimicry && python -m benchmarks.bench_speed

# the MLflow UI on the workspace's store (127.0.0.1:5000); the printed link opens the pipeline's
# training runs (MLflow 3's UI starts on its GenAI view otherwise: README "Browsing the runs table")
ui: setup
	. $(BIN)/activate && python -m stages.registry link && \
	  mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean-outputs:
	rm -rf outputs reports data/prepared mlflow.db mlartifacts dvc.lock metrics/*.json
