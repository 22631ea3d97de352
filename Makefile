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

# The demo's recipe (docs/utility.md): a model pretrained centrally, without DP,
# on a public stand-in (sites/public-phantoms.yaml; KiTS23 in a real
# consortium), then fine-tuned by the federation with DP at 0.3 of the
# from-scratch learning rate.
PRETRAINED := runs/demo-pretrained
PRETRAIN_STEPS := 720
DEMO_RECIPE := --set initial-checkpoint=$(CURDIR)/$(PRETRAINED) --set learning-rate=0.003

demo: $(PRETRAINED)/latest.json
	@echo "demo sites are synthetic phantoms: their privacy ledgers start fresh for each demo"
	rm -rf data/site-state
	$(BIN)/kidneyfl simulate $(DEMO_RECIPE)

# Pretrained once and kept (public data, no privacy cost) until `make clean`.
$(PRETRAINED)/latest.json: $(STAMP) sites/public-phantoms.yaml
	rm -rf $(PRETRAINED)
	$(BIN)/kidneyfl pretrain sites/public-phantoms.yaml --out $(PRETRAINED) \
		--steps $(PRETRAIN_STEPS) --set batch-size=24 \
		--dataset "kidneyfl public phantoms (a stand-in for KiTS23)" \
		--licence "synthetic, no restrictions"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs data .flwr-home
