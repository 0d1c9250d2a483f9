# `make demo` / `make test` create .venv on first use (CPU torch 2.13.0 on these machines) and
# build the native extension; editing csrc/ or setup.py rebuilds it on the next run.
# `make test` (what CI runs) = `make test-cpu` (the suite in .venv) then `make test-cuda` (the
# CUDA build a GPU user makes, checked, and the suite under the GPU machine's torch 2.11.0 and
# triton 3.6.0: .ci/cuda_build.sh; needs nvcc, downloads ~5 GB once into ~/.cache/td_kernels).
# Each step logs its start, end and seconds (.ci/phase).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q

.PHONY: demo test test-cpu test-cuda bench clean

$(VENV)/.deps:
	@.ci/phase "cpu: install torch 2.13.0 and the tools into $(VENV)" sh -c '\
	  $(PYTHON) -m venv $(VENV) && $(PIP) --upgrade pip setuptools wheel && $(PIP) torch==2.13.0 && \
	  $(PIP) "triton>=3.6" numpy ninja pytest hypothesis pytest-benchmark scikit-learn matplotlib tqdm'
	touch $@

# td.shrink_model's dependency graph (torch-pruning), the Llama tests (transformers) and the trainer
# callbacks' tests (accelerate for transformers' Trainer, lightning): none pulls another torch
# (they ask for torch >= some version, which 2.13.0 satisfies)
$(VENV)/.deps-sparsity: $(VENV)/.deps
	@.ci/phase "cpu: install torch-pruning, transformers, accelerate and lightning" $(PIP) torch-pruning transformers accelerate lightning
	touch $@

$(VENV)/.built: $(VENV)/.deps $(VENV)/.deps-sparsity setup.py pyproject.toml $(shell find csrc -type f)
	@.ci/phase "cpu: build (TD_KERNELS_BUILD_EXT=1 pip install --no-build-isolation -e .)" \
	  env TD_KERNELS_BUILD_EXT=1 $(PIP) --no-build-isolation -e .
	touch $@

demo: $(VENV)/.built
	$(VENV)/bin/td-kernels demo --out demo_out

test: test-cpu test-cuda

test-cpu: $(VENV)/.built
	@.ci/phase "cpu: test suite (torch 2.13.0)" $(PY) -m pytest -q

test-cuda:
	@.ci/cuda_build.sh

bench: $(VENV)/.built
	$(VENV)/bin/td-kernels bench --quick

clean:
	rm -rf $(VENV) .cuda-ci build *.egg-info td_kernels/*.so td_kernels/_build.json
