# ctadata: one module, standard library only.  `make help` lists the targets.
PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest
TASKS ?=

.PHONY: help demo install test test-pypy deps zipapp lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

demo: dist/ctadata.pyz  ## try ctadata without an account: a local archive (ctadata serve) and a tour
	@PYTHON=$(PYTHON) bash tests/demo.sh dist/ctadata.pyz

install:  ## pip install this checkout (console scripts ctadata, cta-data)
	$(PYTHON) -m pip install .

deps:  ## install the real test servers (nginx+dav-ext, Apache) when root and missing
	@PYTHON=$(PYTHON) bash tests/install-deps.sh

test: deps  ## the whole suite against real local servers, under CPython then PyPy
	$(PYTEST) -q
	@if command -v pypy3 >/dev/null 2>&1; then $(MAKE) --no-print-directory test-pypy; \
	 else echo "pypy3 not installed: PyPy run skipped (tests/install-deps.sh installs it)"; fi

PYPY_VENV = build/pypy-venv
test-pypy: deps  ## the same suite under PyPy 3 (Debian's pypy3, pytest in a venv)
	@test -x $(PYPY_VENV)/bin/python || { pypy3 -m venv $(PYPY_VENV) && \
	  $(PYPY_VENV)/bin/python -m pip install -q pytest; }
	$(PYPY_VENV)/bin/python -m pytest -q -p no:cacheprovider

zipapp: dist/ctadata.pyz  ## build dist/ctadata.pyz, runnable as python3 dist/ctadata.pyz

# One file: the module and a __main__ that calls ctadata._entry (zipapp's own
# generated __main__.py would drop main()'s exit status).  Source only (~50 KB
# compressed): Python compiles it at start-up (zipimport cannot cache bytecode).
dist/ctadata.pyz: ctadata.py Makefile
	@rm -rf build/zipapp && mkdir -p build/zipapp dist
	cp ctadata.py build/zipapp/
	$(PYTHON) -m zipapp build/zipapp -o dist/ctadata.pyz -m "ctadata:_entry" -p "/usr/bin/env python3" -c
	@ls -l dist/ctadata.pyz

lint:  ## syntax for Python 3.8, pyflakes-style checks with the stdlib only
	$(PYTHON) -c 'import ast,sys; ast.parse(open("ctadata.py").read(), feature_version=(3,8))'
	$(PYTHON) -m py_compile ctadata.py
	$(PYTHON) -W error -c 'import ctadata'

bench: deps  ## benchmark against curl, davix and rclone (TASKS="get_big ls_wide" for a subset)
	@bash tests/bench/install-peers.sh
	$(PYTHON) tests/bench/run.py $(if $(TASKS),--tasks "$(TASKS)")

clean:
	rm -rf build dist *.egg-info .pytest_cache __pycache__ tests/__pycache__
