# ctadata: one module, standard library only.  `make help` lists the targets.
PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest
TASKS ?=
PYTHONS ?=

.PHONY: help demo install test test-pypy test-matrix deps zipapp lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

demo: dist/ctadata.pyz  ## try ctadata without an account: a local archive (ctadata serve) and a tour
	@PYTHON=$(PYTHON) bash tests/demo.sh dist/ctadata.pyz

install:  ## pip install this checkout (console scripts ctadata, cta-data)
	$(PYTHON) -m pip install .

deps:  ## install the real test servers (nginx+dav-ext, Apache) when root and missing
	@PYTHON=$(PYTHON) bash tests/install-deps.sh

test: deps  ## the whole suite against real local servers: CPython, PyPy, then every pyenv Python
	$(PYTEST) -q
	@if command -v pypy3 >/dev/null 2>&1; then $(MAKE) --no-print-directory test-pypy; \
	 else echo "pypy3 not installed: PyPy run skipped (tests/install-deps.sh installs it)"; fi
	@$(MAKE) --no-print-directory test-matrix

PYPY_VENV = build/pypy-venv
test-pypy: deps  ## the same suite under PyPy 3 (Debian's pypy3, pytest in a venv)
	@test -x $(PYPY_VENV)/bin/python || { pypy3 -m venv $(PYPY_VENV) && \
	  $(PYPY_VENV)/bin/python -m pip install -q pytest; }
	$(PYPY_VENV)/bin/python -m pytest -q -p no:cacheprovider

test-matrix: deps  ## the suite under each pyenv Python 3.6-3.13, a line each (PYTHONS="3.6 3.7": those)
	@PYTHON=$(PYTHON) PYTHONS="$(PYTHONS)" bash tests/matrix.sh

zipapp: dist/ctadata.pyz  ## build dist/ctadata.pyz, runnable as python3 dist/ctadata.pyz

# One file: the module and a __main__ that calls ctadata._entry (zipapp's own
# generated __main__.py would drop main()'s exit status).  Source only (~50 KB
# compressed): Python compiles it at start-up (zipimport cannot cache bytecode).
dist/ctadata.pyz: ctadata.py Makefile
	@rm -rf build/zipapp && mkdir -p build/zipapp dist
	cp ctadata.py build/zipapp/
	$(PYTHON) -m zipapp build/zipapp -o dist/ctadata.pyz -m "ctadata:_entry" -p "/usr/bin/env python3" -c
	@ls -l dist/ctadata.pyz

# Python 3.5 must parse the module to reach its version check: its syntax,
# and no f-strings (which ast's feature_version misses from Python 3.12 on).
lint:  ## Python 3.5 syntax (no f-strings), compile, import without warnings
	$(PYTHON) -c 'import ast; ast.parse(open("ctadata.py").read(), feature_version=(3,5))'
	$(PYTHON) -c 'import io, re, tokenize as t; \
	  bad = [k.start[0] for k in t.generate_tokens(io.StringIO(open("ctadata.py").read()).readline) \
	         if k.type == getattr(t, "FSTRING_START", -1) or \
	         k.type == t.STRING and "f" in re.match("[A-Za-z]*", k.string).group().lower()]; \
	  assert not bad, "f-strings (Python 3.6+) on lines %s" % bad'
	$(PYTHON) -m py_compile ctadata.py
	$(PYTHON) -W error -c 'import ctadata'

bench: deps  ## benchmark against curl, davix, rclone; cp against davix-cp, gfal-copy (TASKS="get_big ls_wide" for a subset)
	@bash tests/bench/install-peers.sh
	$(PYTHON) tests/bench/run.py $(if $(TASKS),--tasks "$(TASKS)")
	@# third-party copies between two XRootD (ctadata cp, davix-cp, gfal-copy)
	$(PYTHON) tests/bench/tpc.py

clean:
	rm -rf build dist *.egg-info .pytest_cache __pycache__ tests/__pycache__
