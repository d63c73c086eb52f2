# Two commands: `make demo` and `make test`. Both create .venv, install requirements and the project (editable)
# on first use; the stamp file makes later runs skip the install unless requirements.txt or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= demo
export PYTHONUNBUFFERED := 1

.PHONY: demo test venv pipeline bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -c "import setuptools" 2>/dev/null || $(PY) -m pip install --quiet setuptools
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) pipeline.py --profile demo

pipeline: $(STAMP)
	$(PY) pipeline.py --profile $(PROFILE)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	for b in bench/bench_*.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf model_save/demo data/generated
