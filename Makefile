# Two commands: `make demo` and `make test`. Both create .venv and install requirements on first use;
# the stamp file makes later runs skip the install unless requirements.txt changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= demo
export PYTHONUNBUFFERED := 1

.PHONY: demo test venv pipeline bench clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
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
