# kidneyfl: two commands on a fresh machine.
#   make demo   set up, write phantoms for three hospitals, run the federation with DP
#   make test   set up and run the test suite
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kidneyfl-installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "kidneyfl needs Python 3.11"'
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned resolver would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	@echo "demo sites are synthetic phantoms: their privacy ledgers start fresh for each demo"
	rm -rf data/site-state
	$(BIN)/kidneyfl simulate

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs data .flwr-home
