# Two commands do all the set-up on a fresh machine (see README):
#   make lab    JupyterLab on the course notebooks
#   make test   the whole test suite (unit tests, doctests, browser test, nbval on notebooks/)
# Each creates the virtual environment it needs when it is missing.

PYTHON ?= python3
# Two environments, both built from exactly what Binder installs (binder/, every
# version from requirements/lock.txt):
#   $(VENV)       what students get: `make lab`, and the notebooks under nbval
#                 (plus only the test runner, pytest and nbval);
#   $(TEST_VENV)  the same plus the test extra (the voxelmorph reference, playwright)
#                 for the unit tests.
VENV ?= .venv
TEST_VENV ?= .venv-test
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
# torch: the CPU build, as binder/requirements.txt gets it. A GPU user either
# installs a CUDA build of the lock's torch into $(VENV) first (torch is only
# installed when it cannot be imported) or names its index:
#   make lab TORCH_INDEX=https://download.pytorch.org/whl/cu126
export TORCH_INDEX
SHARED_DATA ?= $(abspath ../shared/data)
ENV_INPUTS := pyproject.toml $(LOCK) binder/requirements.txt binder/postBuild tools/build_env.sh

.PHONY: lab test unit notebooks browser-deps site-scripts course bench lock clean-venv

$(VENV)/.env: $(ENV_INPUTS)
	tools/build_env.sh $(VENV) $(PYTHON)
	touch $@

$(VENV)/.runner: $(VENV)/.env
	$(BIN)/python -m pip install -c $(LOCK) pytest nbval
	touch $@

$(TEST_VENV)/.env: $(ENV_INPUTS)
	tools/build_env.sh $(TEST_VENV) $(PYTHON)
	$(TEST_VENV)/bin/python -m pip install -c $(LOCK) -e ".[test]"
	touch $@

# Jupyter refuses to run as root unless told; containers and CI machines often are root.
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(VENV)/.env
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_FLAGS)

# The browser test drives Debian's chromium; without root or apt it skips and says why.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) ; } || \
	  echo "chromium could not be installed: the browser test will be skipped"

# The static site's scripts for widgets and formulas (regedu.course.site_scripts: npm registry,
# pinned and verified) for the test that draws them offline; that test skips without them.
site-scripts: $(TEST_VENV)/.env
	@$(TEST_VENV)/bin/python -c "from regedu.course import site_scripts; site_scripts()" >/dev/null || \
	  echo "the site's scripts could not be fetched: the offline widget test will be skipped"

unit: $(TEST_VENV)/.env browser-deps site-scripts
	$(TEST_VENV)/bin/python tools/lock.py check
	REGEDU_PROFILE=ci REGEDU_MIRROR=$(SHARED_DATA) $(TEST_VENV)/bin/python -m pytest tests regedu

# The notebooks run in the students' environment, which holds no test extra: every
# notebook under nbval (pytest --nbval-lax), several at a time, one thread each.
notebooks: $(VENV)/.runner
	$(BIN)/python tools/lock.py check --runtime
	REGEDU_PROFILE=ci REGEDU_MIRROR=$(SHARED_DATA) $(BIN)/python tools/run_notebooks.py notebooks

test: unit notebooks

course: $(VENV)/.env
	$(BIN)/regedu course

# The executed course as a static site: index.html and one page per notebook,
# figures inline, the scripts that draw widgets and formulas in $(SITE)/_static (fetched once from the
# npm registry); open $(SITE)/index.html or serve the folder.
#   make site SITE_PROFILE=gpu SITE=public
SITE ?= site
SITE_PROFILE ?= cpu
.PHONY: site
site: $(VENV)/.env
	$(BIN)/regedu course --profile $(SITE_PROFILE) --out $(SITE) --scripts local

bench: $(TEST_VENV)/.env
	$(TEST_VENV)/bin/python benchmarks/bench_core.py

# Resolve every package afresh (newest versions pyproject.toml allows) and rewrite
# the lock; then rebuild the environments: make clean-venv test
lock:
	$(PYTHON) tools/lock.py refresh

clean-venv:
	rm -rf $(VENV) $(TEST_VENV)
