# The verbs a newcomer needs. `make demo` and `make test` bootstrap everything they use and are
# idempotent: a second run reuses the venv, the dataset and the tools the first one installed.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: help venv data tools demo test test-slow lint format compile check-yamls images manifests checkov gpu-check gpu-check-smoke gpu-check-wheels bench-curation clean

help:
	@echo "make demo      run the full pipeline locally (kfp.local + embedded S3 store)"
	@echo "make demo-containers  the same pipeline in the built images (kfp.local DockerRunner)"
	@echo "make test      run the test suite (fast tests; 'make test-slow' for the long ones)"
	@echo "make test-containers  build the images, run the tiny pipeline in them (CI's second step)"
	@echo "make lint      ruff + mypy on the typed edges"
	@echo "make compile   recompile components/ and pipelines/ YAMLs"
	@echo "make images    build the images through the Docker API (Docker, else podman's service;"
	@echo "               IMAGES_ARGS='--registry R --push')"
	@echo "make manifests regenerate manifests/ (kustomize) from the chart"
	@echo "make checkov   policy checks on the rendered chart and the Dockerfiles"

# The same install step the images use (tests/test_deploy_* compares them), then the tooling
# (benchmarks, demo pool, image builder), which stays out of the images.
$(STAMP): pyproject.toml constraints.txt tools/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -c constraints.txt -e tools
	@touch $(STAMP)

venv: $(STAMP)

data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" \
	       "(or set DINOFLOW_FASHION_MNIST_DIR to a folder with its four IDX .gz files)"; exit 1; \
	fi

tools:
	@if [ -x scripts/install-tools.sh ]; then scripts/install-tools.sh; fi

demo: venv data
	$(BIN)/dinoflow demo

test: venv data tools
	$(BIN)/pytest $(PYTEST_ARGS)

test-slow: venv data tools
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

# Builds both images (cached under DINOFLOW_CACHE_DIR) and runs the tiny pipeline in them; skips in
# one line where no container engine can start. CI's second step: 28 min cold, 12 warm (README).
test-containers: venv data container-tools
	$(BIN)/pytest -m containers tests/test_containers.py $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check src tests components pipelines tools
	$(BIN)/ruff format --check src tests components pipelines tools
	$(BIN)/mypy src/dinoflow/stages src/dinoflow/settings.py src/dinoflow/storage

format: venv
	$(BIN)/ruff check --fix src tests components pipelines tools
	$(BIN)/ruff format src tests components pipelines tools

compile: venv
	$(BIN)/dinoflow compile

check-yamls: venv
	$(BIN)/dinoflow compile --check

container-tools:
	@scripts/install-container-tools.sh

# Through the Docker API of whatever engine serves it: Docker, else a podman service that
# dinoflow_tools.images starts and stops (no registry here: debootstrap base + host wheelhouse).
IMAGES_ARGS ?=
images: venv container-tools
	$(BIN)/python -m dinoflow_tools.images $(IMAGES_ARGS)

# The demo's full pipeline in the images, against the embedded store on the host.
demo-containers: venv data container-tools
	$(BIN)/python -m dinoflow_tools.images $(IMAGES_ARGS) -- $(BIN)/dinoflow demo --containers

# The tiny pipeline in-process and in the images: stage seconds side by side, last line JSON.
bench-containers: venv data container-tools
	$(BIN)/python -m dinoflow_tools.images $(IMAGES_ARGS) -- $(BIN)/python -m dinoflow_tools.containers

manifests: venv tools
	$(BIN)/python scripts/render-manifests.py

checkov: venv tools
	@test -x .tools/checkov-venv/bin/checkov || ($(PYTHON) -m venv .tools/checkov-venv && .tools/checkov-venv/bin/pip install -q checkov)
	.tools/bin/helm template dinoflow charts/dinoflow -f charts/dinoflow/ci/external-s3-values.yaml > .tools/dinoflow-chart.yaml
	.tools/checkov-venv/bin/checkov -f .tools/dinoflow-chart.yaml --framework kubernetes --config-file charts/dinoflow/.checkov.yaml --compact
	.tools/checkov-venv/bin/checkov -f images/Dockerfile.cpu -f images/Dockerfile.cuda --framework dockerfile --compact

gpu-check:  ## one-shot GPU check (needs CUDA, ~6 min): ViT-S/L/g step vs backbone MFU, compile, checkpointing, profile
	bash scripts/gpu_check.sh

gpu-check-smoke: venv  ## the same script on the CPU with tiny sizes
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh --cpu-smoke

# What the lent GPU machine (Python 3.12, torch, no pydantic/minio) lacks, pinned as in the venv;
# scripts/gpu_check.sh installs them from here when its imports fail (carry .tools/gpu-wheels).
GPU_WHEELS := .tools/gpu-wheels
GPU_WHEEL_PKGS := pydantic pydantic-core pydantic-settings annotated-types typing-inspection typing-extensions \
  python-dotenv minio argon2-cffi argon2-cffi-bindings cffi pycparser pycryptodome timm
gpu-check-wheels: venv  ## wheels for the GPU machine's Python 3.12 (~9 MB) into .tools/gpu-wheels
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(GPU_WHEELS) $$($(BIN)/python -c "import sys, importlib.metadata as m; \
	  print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $(GPU_WHEEL_PKGS))

bench-curation: venv data  ## dedup (pixel and bootstrapped-backbone embedders), curate, dedup at 1M, embed
	$(BIN)/dinoflow bench dedup --size 100000
	$(BIN)/dinoflow bench dedup --size 100000 --embedder backbone
	$(BIN)/dinoflow bench curate --size 100000
	$(BIN)/dinoflow bench dedup-scale
	$(BIN)/dinoflow bench embed

clean:
	rm -rf demo-out .pytest_cache .ruff_cache .mypy_cache
