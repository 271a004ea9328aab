# genreclf: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of PyTorch; for a GPU, see README ("GPU").
TORCH  ?= torch==2.13.0

.PHONY: all setup test demo bench clean

all: test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/genreclf demo --out demo_out

clean:
	rm -rf $(VENV) demo_out build dist src/*.egg-info
