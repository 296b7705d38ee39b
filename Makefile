# The front door: `make demo` sets everything up and runs the main job; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_ROWS ?= 200000

.PHONY: install demo test lint format clean

$(STAMP): pyproject.toml constraints.txt requirements-torchrec.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# constraints.txt pins torch to the CPU build; a looser range pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,torchrec]'
	# TorchRec (--model.sharding torchrec) without its metadata's CUDA fbgemm-gpu (Linux wheels).
	if [ "$$(uname)" = Linux ]; then $(BIN)/pip install --quiet --disable-pip-version-check \
		--no-deps -r requirements-torchrec.txt; fi
	touch $(STAMP)

install: $(STAMP)

# synth -> fit HoME -> evaluate -> export -> promote -> serve -> one ranked request (scripts/demo.sh)
demo: install
	BIN=$(BIN) DEMO_ROWS=$(DEMO_ROWS) bash scripts/demo.sh

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -p no:cacheprovider --durations=15

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) data mlflow.db mlruns mlartifacts checkpoints reports exports
