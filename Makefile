# Two commands do all the set-up on a fresh machine (see README):
#   make lab    JupyterLab on the course notebooks
#   make test   the whole test suite (unit tests, doctests, browser test, nbval on notebooks/)
# Each creates the virtual environment it needs when it is missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CI and Binder get torch's CPU build. A GPU user who already has a CUDA build
# in $(VENV) keeps it (torch is only installed when it cannot be imported), or
# picks another wheel index: make lab TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
SHARED_DATA ?= $(abspath ../shared/data)

.PHONY: lab test unit notebooks browser-deps course bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# A +cpu wheel that pip can already see (a local wheel house or mirror) is used
# as it is; otherwise torch's CPU index is asked.
$(VENV)/.torch: | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
	  $(BIN)/python -m pip install "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_INDEX)
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, 'CUDA' if torch.cuda.is_available() else 'CPU')"
	touch $@

$(VENV)/.runtime: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

# Jupyter refuses to run as root unless told; containers and CI machines often are root.
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(VENV)/.runtime
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_FLAGS)

# The browser test drives Debian's chromium; without root or apt it skips and says why.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) ; } || \
	  echo "chromium could not be installed: the browser test will be skipped"

unit: $(VENV)/.test browser-deps
	REGEDU_PROFILE=ci REGEDU_MIRROR=$(SHARED_DATA) $(BIN)/python -m pytest tests regedu

notebooks: $(VENV)/.test
	REGEDU_PROFILE=ci REGEDU_MIRROR=$(SHARED_DATA) $(BIN)/python -m pytest --nbval-lax -p no:cacheprovider notebooks/

test: unit notebooks

course: $(VENV)/.runtime
	$(BIN)/regedu course

bench: $(VENV)/.test
	$(BIN)/python benchmarks/bench_core.py

clean-venv:
	rm -rf $(VENV)
