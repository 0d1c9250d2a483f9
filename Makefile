# `make demo` / `make test` create .venv on first use (CPU torch 2.13.0 on these machines) and
# build the native extension; editing csrc/ or setup.py rebuilds it on the next run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q

.PHONY: demo test bench clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch==2.13.0
	$(PIP) "triton>=3.6" numpy ninja pytest hypothesis pytest-benchmark scikit-learn matplotlib tqdm
	touch $@

# td.shrink_model's dependency graph (torch-pruning), the Llama tests (transformers) and the trainer
# callbacks' tests (accelerate for transformers' Trainer, lightning): none pulls another torch
# (they ask for torch >= some version, which 2.13.0 satisfies)
$(VENV)/.deps-sparsity: $(VENV)/.deps
	$(PIP) torch-pruning transformers accelerate lightning
	touch $@

$(VENV)/.built: $(VENV)/.deps $(VENV)/.deps-sparsity setup.py pyproject.toml $(shell find csrc -type f)
	TD_KERNELS_BUILD_EXT=1 $(PIP) --no-build-isolation -e .
	touch $@

demo: $(VENV)/.built
	$(VENV)/bin/td-kernels demo --out demo_out

test: $(VENV)/.built
	$(PY) -m pytest -q

bench: $(VENV)/.built
	$(VENV)/bin/td-kernels bench --quick

clean:
	rm -rf $(VENV) build *.egg-info td_kernels/*.so
