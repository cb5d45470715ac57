# Set-up and entry points. `make test` and `make demo` work on a fresh machine:
# they create .venv when it is missing and install the project under constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxqp-installed

.PHONY: test demo venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# CI=true selects the deterministic, bounded hypothesis profile.
test: $(STAMP)
	$(PY) -m pytest -q --hypothesis-profile=ci -m "not heavy" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/fxqp demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
