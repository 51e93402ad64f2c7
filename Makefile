# The two commands the README starts with:
#   make run    set up an environment and run the main job (JOB, hello-pt-mlflow) in the simulator
#   make test   set up an environment and run lint, type checks and the tests
# TORCH picks the PyTorch to install when the environment has none (TORCH=torch for the latest release).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DATA ?= data/cifar10
JOB ?= jobs/hello-pt-mlflow
WORKSPACE ?= workspaces/$(notdir $(JOB))
CLIENTS ?= 2
THREADS ?= 2
SHARED_LAYOUT := ../shared/tools/cifar10-python-layout

BIN := $(VENV)/bin

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	touch $@

$(VENV)/.run: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[tracking]"
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# Offline machines with ../shared beside the checkout build the data set from its JPEG copy;
# elsewhere the job downloads the official archive into $(DATA) on first use.
$(DATA)/cifar-10-batches-py/test_batch:
	@if [ -f $(SHARED_LAYOUT) ]; then \
		$(BIN)/pip install --quiet pillow && $(BIN)/python $(SHARED_LAYOUT) $(DATA); \
	fi

run: $(VENV)/.run | $(DATA)/cifar-10-batches-py/test_batch
	$(BIN)/fedstream simulate $(JOB) -w $(WORKSPACE) -n $(CLIENTS) -t $(THREADS) \
		--set client.trainer.args.data.root=$(DATA)

test: $(VENV)/.test
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	rm -rf .coverage && mkdir .coverage
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report

bench: $(VENV)/.test
	$(BIN)/python bench/core.py --repeat 3

clean:
	rm -rf $(VENV) workspaces bench/out .coverage
