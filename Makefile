# Set-up and entry points. `make test`, `make demo` and `make docs` work on a fresh machine:
# they create .venv when it is missing and install the project under constraints.txt —
# `make demo` the core and the cli extra, `make test` and `make docs` everything (.[dev]).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SITE ?= site

.PHONY: test lint demo docs venv clean

venv: $(VENV)/.fxqp-dev

# One stamp per extra installed: $(VENV)/.fxqp-dev, $(VENV)/.fxqp-cli.
$(VENV)/.fxqp-%: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[$*]'
	touch $@

# CI=true selects the deterministic, bounded hypothesis profile.
test: $(VENV)/.fxqp-dev lint
	$(PY) -m pytest -q --hypothesis-profile=ci -m "not heavy and not fuzz" $(PYTEST_ARGS)

# ruff: the linter's rules and the formatter's layout are in pyproject.toml
lint: $(VENV)/.fxqp-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(VENV)/.fxqp-cli
	$(VENV)/bin/fxqp demo

# The documentation site, into $(SITE)/; --strict turns every warning (a broken link or
# anchor, a docstring the API reference cannot parse) into a failure.
docs: $(VENV)/.fxqp-dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir $(SITE)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis $(SITE)
