# genreclf: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of PyTorch; for a GPU, see README ("GPU").
TORCH  ?= torch==2.13.0
# Pinned versions of everything installed (see the file's header; `make constraints` refreshes it).
CONSTRAINTS ?= constraints.txt

.PHONY: all setup test lint chromium demo demo-pretraining compare-demo compare-losses constraints clean

all: test

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# tests/test_serve.py drives the page in Debian's Chromium (Playwright's own browsers are not downloaded);
# where apt-get is missing or not ours to run, the browser test is skipped (and fails under CI=true).
test: lint chromium
	$(PY) -m pytest -q

chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { command -v apt-get >/dev/null && \
	    $$( [ "$$(id -u)" = 0 ] || echo sudo -n ) sh -c 'apt-get update -qq && apt-get install -y -qq chromium' \
	    >/dev/null; } || \
	  echo "make: Chromium could not be installed; the browser test will be skipped (CI=true: it fails)"

demo: setup
	$(VENV)/bin/genreclf demo --out demo_out

# The demo, then pretraining with each masking + fine-tuning, against the Transformer from scratch.
demo-pretraining: setup
	$(VENV)/bin/genreclf demo --out demo_out --pretraining

# The demo, then 3 training seeds of each model compared over seeds and test tracks (`genreclf compare`).
compare-demo: setup
	$(VENV)/bin/genreclf demo --out demo_out --compare

# The four losses compared over 3 seeds of the GRU on a long-tailed synthetic corpus (99 genres, the top one on
# ~27% of tracks, 44 on under 1%): synth, featurize, `genreclf compare --losses` into losses_out/.
compare-losses: setup
	$(VENV)/bin/genreclf synth losses_out/corpus --tracks 800 --seconds 10 --genres 99 --zipf 1.0
	$(VENV)/bin/genreclf featurize --data losses_out/corpus --out losses_out/store
	$(VENV)/bin/genreclf compare --store losses_out/store --out losses_out/compare --models gru \
		--losses bce focal asymmetric lsep --seeds 3 --epochs 14 --batch-size 16 --lr 1e-3 --workers 0

# Newest releases that pyproject.toml allows, in a throw-away venv, frozen into constraints.txt.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/pip install -q --upgrade pip
	.venv-constraints/bin/pip install -q "$(TORCH)"
	.venv-constraints/bin/pip install -q -e ".[test]"
	( sed -n '/^#/p' $(CONSTRAINTS); .venv-constraints/bin/pip freeze --exclude-editable | sed 's/+cpu//' ) > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-constraints

clean:
	rm -rf $(VENV) demo_out losses_out build dist src/*.egg-info
