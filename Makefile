# The two commands of the README's Quick start, each doing all of its own set-up:
#   make lesson   creates .venv, installs minicnn, makes sure Fashion-MNIST is there, runs lesson 2
#   make test     the same set-up, the 100-column and lint check (ruff), then the test suite
# and make notebooks: every lesson as an executed notebook, outputs included, in notebooks/
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LESSON ?= lessons/lesson2.py
ARGS ?=

.PHONY: lesson test notebooks lint data venv bench clean

lesson: data
	$(PYTHON) $(LESSON) $(ARGS)

# -n auto: one pytest worker per core (pytest-xdist), the tests one torch thread each;
# worksteal: an idle worker takes queued tests from a busy one (the default, load, left one
# core idle for the last 100 s of lesson notebooks queued on the other)
test: data lint
	$(PYTHON) -m pytest -n auto --dist worksteal $(ARGS)

# ruff.toml: pyflakes and pycodestyle errors, lines of at most 100 characters
lint: $(STAMP)
	$(PYTHON) -m ruff check minicnn lessons

notebooks: data
	$(PYTHON) lessons/notebooks.py $(ARGS)

venv: $(STAMP)

# Reinstalled when setup.py changes. On a machine without torch this brings PyPI's
# torch (the CUDA build, a few GB); where pip is capped to a local copy it uses that.
$(STAMP): setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	PIP_DISABLE_PIP_VERSION_CHECK=1 $(PYTHON) -m pip install --progress-bar off -q -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST: the local copy if there is one; else Debian's package where apt-get
# can be used; else torchvision's download into ~/.cache/minicnn; else say how.
data: $(STAMP)
	@if $(PYTHON) -m minicnn.fashion_mnist 2>/dev/null; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi; \
	  echo "Installing Debian's dataset-fashion-mnist"; \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || true; \
	fi; \
	if $(PYTHON) -m minicnn.fashion_mnist 2>/dev/null; then exit 0; fi; \
	echo "Downloading Fashion-MNIST through torchvision"; \
	$(PYTHON) -m minicnn.fashion_mnist --download || { \
	  echo "Could not get Fashion-MNIST. Install Debian's dataset-fashion-mnist, or put the four IDX"; \
	  echo "files (train-images-idx3-ubyte.gz, ...) in a folder and set MINICNN_DATA=that/folder."; exit 1; }

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PYTHON) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
