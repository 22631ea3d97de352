# kidneyfl: two commands on a fresh machine.
#   make demo   set up, write phantoms for three hospitals, run the federation with DP
#   make test   set up and run the test suite
#   make demo-prognosis   the prognosis task on phantoms with outcomes
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kidneyfl-installed

.PHONY: setup demo demo-prognosis test lint lock clean

# Every install is hash-checked against requirements/*.lock (docs/builds.md):
# pip first (pip.lock), then every distribution at its locked version and
# sha256 (dev.lock: the runtime lock plus the dev tools; torch is the CPU build),
# then hatchling (build.lock) to install the project itself, which resolves and
# downloads nothing. A changed lock rebuilds .venv from scratch ($? holds the
# prerequisites newer than the stamp), so it holds exactly the locked set.
LOCKS := requirements/pip.lock requirements/dev.lock requirements/build.lock

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCKS)
	$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "kidneyfl needs Python 3.11"'
	$(PY) -m venv $(if $(filter %.lock,$?),--clear) $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/pip.lock
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.lock
	$(BIN)/pip install --quiet --require-hashes -r requirements/build.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-lock after a change to pyproject.toml's dependencies; for a security fix,
# requirements/update.sh -P <package> (docs/builds.md).
lock:
	requirements/update.sh

# The demo's recipe (docs/utility.md): a model pretrained centrally, without DP,
# on a public stand-in (sites/public-phantoms.yaml; KiTS23 in a real
# consortium), then fine-tuned by the federation with DP at 0.3 of the
# from-scratch learning rate, for two rounds: rounds 3 to 5 of the plan's five
# moved no site's kidney Dice by more than 0.01 (docs/benchmarks.md), and two
# rounds spend the same epsilon 8 with less noise per step.
PRETRAINED := runs/demo-pretrained
PRETRAIN_STEPS := 360
DEMO_ROUNDS := 2
DEMO_RECIPE := --set initial-checkpoint=$(CURDIR)/$(PRETRAINED) --set learning-rate=0.003 \
	--set num-server-rounds=$(DEMO_ROUNDS)

demo: $(PRETRAINED)/latest.json
	@echo "demo sites are synthetic phantoms: their privacy ledgers start fresh for each demo"
	rm -rf data/site-state
	$(BIN)/kidneyfl simulate $(DEMO_RECIPE)

# The prognosis task (docs/prognosis.md): three phantom hospitals with outcomes
# from a known hazard, FedAvg with DP, C-index and epsilon per round.
PROGNOSIS_SITES := sites/prognosis/hospital-a.yaml,sites/prognosis/hospital-b.yaml,sites/prognosis/hospital-c.yaml
demo-prognosis: $(STAMP)
	@echo "demo sites are synthetic phantoms: their privacy ledgers start fresh for each demo"
	rm -rf data/site-state-prog
	$(BIN)/kidneyfl simulate --sites $(PROGNOSIS_SITES) --plan sites/prognosis/plan.toml

# Pretrained once and kept (public data, no privacy cost) until `make clean`.
$(PRETRAINED)/latest.json: $(STAMP) sites/public-phantoms.yaml
	rm -rf $(PRETRAINED)
	$(BIN)/kidneyfl pretrain sites/public-phantoms.yaml --out $(PRETRAINED) \
		--steps $(PRETRAIN_STEPS) --set batch-size=24 \
		--dataset "kidneyfl public phantoms (a stand-in for KiTS23)" \
		--licence "synthetic, no restrictions"

# Two workers (pytest-xdist): the end-to-end deployment files, which mostly
# wait on Flower's polls and heartbeats, on one; every other test on the other,
# in a plain run's order (tests/conftest.py; README, Tests).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs data .flwr-home
