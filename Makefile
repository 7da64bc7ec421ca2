# bitalloc: `make demo` and `make test` work from a clean clone on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_WORKERS ?= 2

.PHONY: venv demo test fashion-mnist bench clean

# The virtual environment, with torch pinned (constraints.txt) so pip never resolves a CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[all,test]'
	touch $@

venv: $(VENV)/.installed

# Debian's Fashion-MNIST (IDX files under $(FASHION_MNIST_DIR)), installed only when missing.
fashion-mnist:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Installing Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	fi

demo: venv fashion-mnist
	$(VENV)/bin/bitalloc demo --data $(FASHION_MNIST_DIR) --out runs/demo

test: venv fashion-mnist
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --timeout 900 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
