# `make demo` and `make test` create .venv and install everything they need on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-full demo-fashion study study-rest study-full test test-fast gpu-wheels gpu-check lab install data glyphs browser kernel clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name nbsrc --display-name "Python (nbsrc)" >/dev/null
	touch $(STAMP)

install: $(STAMP) data

# Debian's dataset-fashion-mnist puts the real files in /usr/share/datasets/fashion-mnist.
# Without root/apt the reader falls back to $$NBSRC_DATA or a download (see docs/architecture.md, nbsrc.data).
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) \
		|| echo "warning: could not install dataset-fashion-mnist with apt-get"; \
	fi

# CJK glyphs (nbsrc/data/glyphs.py): Debian's CJK font packages (about 300 MB), installed with apt
# when run as root and a face is missing, then the dataset rendered once into $$NBSRC_DATA/glyphs or
# ~/.cache/nbsrc/glyphs (later runs find the cache). Without root/apt the build names the missing packages.
glyphs: $(STAMP)
	@if ! $(PY) -m nbsrc.data.glyphs check >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		pkgs="$$($(PY) -m nbsrc.data.glyphs packages)"; \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$pkgs >/dev/null 2>&1 \
		 || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$pkgs >/dev/null)) \
		|| echo "warning: could not install the CJK font packages with apt-get"; \
	fi
	$(PY) -m nbsrc.data.glyphs build

# Headless Chromium + its driver for the JupyterLab widget test (tests/test_browser.py).
browser:
	@if ! command -v chromedriver >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null)) \
		|| echo "warning: could not install chromium/chromium-driver with apt-get; the browser test will be skipped"; \
	fi

# The demo on the CJK glyphs: pretraining on 1,000 classes, fine-tuning on 500 others, evaluation on 500 unseen ones.
# One seed by default (a smoke test within 15 minutes: its verdicts read inconclusive); DEMO_SEEDS="0 1 2"
# trains three, as `python -m nbsrc demo` does, and judges the claims on the demo's short runs.
DEMO_SEEDS ?= 0
demo: install glyphs
	$(PY) -m nbsrc demo --seeds $(DEMO_SEEDS)

# The demo and its grids (notebooks 04, 07, 08: claims C5 and C7 over three seeds, DToP's ablations).
demo-full: install glyphs
	$(PY) -m nbsrc demo --full

# The study (nbsrc/paper/study.py): the claims C1, C2, C3 and C6 where fine-tuning has done its work, its choices made on the
# validation classes; results in figures/study/. Resumable: after a kill, the same command continues.
study: install glyphs
	$(PY) -m nbsrc study
# The claims `make study` leaves out, judged into the same figures/study/ beside its verdicts: C4 (the convnet),
# C5 (the beta x lambda grid) and C7 (the poolings, both at grid_iterations). It reuses make study's pretraining
# and selection runs and its IRT_L runs of seeds 0-2 where they are in runs/study; estimated 2 h on the 2-core AMD host
# after `make study`, 2.8 h on its own, about half that on the Intel host of 2026-12-07 (docs/results.md, the study).
study-rest: install glyphs
	$(PY) -m nbsrc study --set claims '["C4", "C5", "C7"]'
# Every claim in one invocation: estimated 3.6 h here.
study-full: install glyphs
	$(PY) -m nbsrc study --set claims '["C1", "C2", "C3", "C4", "C5", "C6", "C7"]'

# The second demo: Fashion-MNIST (train on classes 0-4, evaluate on the unseen 5-9), from random init.
demo-fashion: install
	$(PY) -m nbsrc demo --demo fashion_mnist

# pytest-xdist: TEST_WORKERS processes share the tests; a module whose tests share a fixture is marked
# xdist_group and runs on one worker (--dist loadgroup), in the order tests/conftest.py gives (long work first,
# --no-loadscope-reorder), and each worker gets one torch thread. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# ruff (configured in pyproject.toml): `make lint` on its own, and `make test` (so CI) runs it before pytest;
# `make test LINT=0` skips it. (Not `LINT ?= 1`: GNU make defines LINT = lint itself, which `?=` would keep.)
ifeq ($(origin LINT),default)
LINT := 1
endif

.PHONY: lint
lint: $(STAMP)
	$(PY) -m ruff check .

test: install browser
ifeq ($(LINT),1)
	$(PY) -m ruff check .
endif
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

# The GPU checks (bench/gpu_check.sh: tests/test_cuda.py and the train benchmark on CUDA), for a machine with
# a GPU whose python3 already has torch but nothing can be fetched: `make gpu-wheels` here (pip reaches PyPI)
# puts the wheels it lacks, for Python $(GPU_PYTHON), in .whl/; then, there, `make gpu-check` (or
# `bash bench/gpu_check.sh`) installs them into /tmp/site and runs the checks with that python3.
GPU_PYTHON ?= 3.12
GPU_WHEELS := faiss-cpu==1.15.1 pytorch-metric-learning==2.9.0 timm==1.0.31

gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

gpu-check:
	bash bench/gpu_check.sh

lab: install
	JUPYTER_PATH=$(CURDIR)/$(VENV)/share/jupyter $(VENV)/bin/jupyter lab notebooks/

clean-runs:
	@echo "runs/ holds your experiments; remove it by hand if you really mean to: rm -r runs/"
