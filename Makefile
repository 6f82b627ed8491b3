# One entry point for a fresh machine.
#   make demo   set up .venv and run the main job (continual learning on MNIST)
#   make test   set up .venv and run the whole test suite (Triton under its interpreter
#               when there is no GPU); CI runs it
#   make test-quick  the suite without the tests marked slow (the edit-test loop, < 3 min on 2 cores)
#   make check  set up .venv and run ruff (the rules are in pyproject.toml)
#   make bench  set up .venv and run the benchmarks (writes bench/results/cpu.{json,png,txt})
#   make audit  set up .venv and compile every Triton kernel for sm_80/sm_90 (no GPU
#               needed): registers, spills, shared memory, access widths, tensor cores
#
# torch is installed first and pinned: on a CPU machine `torch==2.13.0` takes the
# local CPU wheel, while a bare `torch` requirement could pull a multi-GB CUDA
# build. Override with e.g. `make test TORCH_SPEC="torch==2.11.0"`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test test-quick check demo bench audit clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile $(wildcard setup.py) $(wildcard csrc/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "setuptools>=70" wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# Every later install is held to that torch: one that asks for another (a CUDA build, say) fails.
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	# No build isolation: the native CPU kernels build now, against the torch above.
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt --no-build-isolation -e ".[test,demo,bench,lint]"
	# Avalanche for tests/test_integrations_avalanche.py, without its metadata's dependencies (~90
	# packages, jax among them, and torchvision, which pytorchcv asks for too): --no-deps for those
	# two, the packages `import avalanche` needs, then torchvision alone, --no-deps, in a folder off
	# sys.path that the Avalanche test adds (PyPI's x86_64 torchvision is a CUDA build whose compiled
	# ops do not load beside the CPU torch: bench/integrations.py says how it is imported anyway).
	$(BIN)/pip install -q --no-deps "avalanche-lib==0.6.0" "pytorchcv==0.0.74"
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt dill gdown gputil psutil qpsolvers tensorboard \
		torchmetrics wandb
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/avalanche-torchvision "torchvision==0.28.0"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

check: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/python -m examples.split_mnist --out demo_out

bench: $(STAMP)
	$(BIN)/python -m bench --json bench/results/cpu.json --plot bench/results/cpu.png --txt bench/results/cpu.txt

# The audit compiles for real GPU targets, so never under the Triton interpreter.
audit: $(STAMP)
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 $(BIN)/python -m mas_kernels.audit \
		--json bench/results/audit.json --summary bench/results/audit.txt --quiet

clean:
	rm -rf $(VENV) build *.egg-info
