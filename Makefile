# Two commands do everything on a fresh machine with Python 3.9+ and a C++ compiler:
#   make bench   - the main job: benchmark suite and dense-block memory comparison (CPU by default)
#   make test    - the test suite
# Both create .venv, install torch and resfast (building resfast._C) first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
export RESFAST_BUILD_EXT ?= 1
# pytest-xdist workers of `make test` (one per core of a 2-core machine; 0 runs the suite in one process)
TEST_WORKERS ?= 2
# The triton of the GPU machine benchmarks/gpu_check.sh runs on (torch 2.11, triton 3.6), beside
# the venv's newer one: `make test` also compiles the kernels for sm_90 with it
# (tests/test_static_model.py), so a kernel only a newer triton accepts fails here, not there.
DEVICE_TRITON ?= 3.6.0
DEVICE_TRITON_DIR := $(VENV)/device-triton-$(DEVICE_TRITON)
# The GPU machine's torch, for `make test-device-env` (a venv of its own beside .venv)
DEVICE_TORCH ?= torch==2.11.0 torchvision==0.26.0
DEVICE_VENV ?= .venv-device

.PHONY: install bench test test-slow test-all test-device-triton test-device-env memory clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*/*.h csrc/include/*/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_SPEC) ninja numpy
	$(PY) -m pip install --quiet "triton>=3.0" || true
	$(PY) -m pip install --no-build-isolation -e ".[dev,train]"
	$(PY) -c "import resfast, sys; print(resfast.__version__, file=sys.stderr)"
	touch $@

install: $(VENV)/.installed

# (a failed download is reported, and the test that needs it skips saying so)
$(DEVICE_TRITON_DIR)/.installed: | $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps --target $(DEVICE_TRITON_DIR) "triton==$(DEVICE_TRITON)" && touch $@ \
		|| echo "WARNING: triton $(DEVICE_TRITON) (the GPU machine's) could not be installed" >&2

bench: install
	$(PY) -m pytest benchmarks --benchmark-only -q -p no:cacheprovider
	$(VENV)/bin/resfast memory --model densenet121 --batch-size 8 --image-size 224 --plot out/memory.png

memory: install
	$(VENV)/bin/resfast memory --model densenet121 --batch-size 8 --image-size 224

# `make test` leaves out the tests marked slow (pyproject.toml: a whole model through torch.compile,
# every tile config compiled for sm_90 with a cold cache, ...); `make test-slow` runs just those, and
# `make test-all` both. .ci/run runs `make test`, then `make test-slow` in what is left of its budget.
test: install
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=15 -n $(TEST_WORKERS) --dist loadscope -m "not slow"
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable

# (SLOW_PYTEST_FLAGS: more pytest options, e.g. -x, as .ci/run passes)
SLOW_PYTEST_FLAGS ?=
test-slow: install
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=15 -n $(TEST_WORKERS) --dist loadscope -m slow $(SLOW_PYTEST_FLAGS)

test-all: test test-slow

# Every tile config of the Triton kernels of five shapes compiled for sm_90 with the GPU machine's
# triton (tests/test_static_model.py::test_kernels_compile_with_the_gpu_machines_triton; about 5
# minutes, cold). `make test` skips it (RESFAST_DEVICE_TRITON unset); .ci/run runs it after.
test-device-triton: install $(DEVICE_TRITON_DIR)/.installed
	RESFAST_DEVICE_TRITON=$(abspath $(DEVICE_TRITON_DIR)) RESFAST_DEVICE_TRITON_VERSION=$(DEVICE_TRITON) \
	$(PY) -m pytest tests/test_static_model.py -q -p no:cacheprovider -k gpu_machines_triton

# The test suite under the GPU machine's torch and triton (2.11 and 3.6; benchmarks/gpu_check.sh
# runs there), from this tree without installing it: eager PyTorch and every torch API resfast
# calls. Triton kernels (no interpreter: TRITON_INTERPRET=0) and resfast._C (built for .venv's
# torch) skip with their reasons; the extension's own build checks (CI's RESFAST_REQUIRE_CUDA_BUILD=1
# holds for .venv's build, which `make test` checks) and the static model (whose triton-3.6
# compile `make test` checks) are left out. Catches what only the older torch refuses
# before a GPU session's minutes find it. .ci/run runs it after `make test`.
# torch 2.11 and torchvision 0.26 come without their CUDA libraries (about 2.7 GB more to download):
# .venv's, the same CUDA 13 major release, are linked in (nothing here runs them: no GPU; torch
# loads them at import). Their other dependencies and the test tools need no torch.
DEVICE_SITE = $$($(DEVICE_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
$(DEVICE_VENV)/.installed: | $(VENV)/.installed
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(DEVICE_VENV)/bin/python -m pip install --quiet filelock typing_extensions sympy networkx jinja2 fsspec \
		pillow numpy pytest pytest-xdist pytest-benchmark hypothesis tqdm matplotlib scikit-learn \
		huggingface_hub pyyaml safetensors
	$(DEVICE_VENV)/bin/python -m pip install --quiet --no-deps $(DEVICE_TORCH) "triton==$(DEVICE_TRITON)" timm
	ln -sfn "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia" "$(DEVICE_SITE)/nvidia"
	$(DEVICE_VENV)/bin/python -c "import torch, torchvision, timm; print('device venv: torch', torch.__version__)"
	touch $@

# Then the Triton backend's host code (op registration, autograd, fake tensors, launch plans) under
# torch 2.11 on a subset of the triton tests, its kernels run by .venv's newer triton's interpreter.
DEVICE_INTERP_TRITON_DIR := $(DEVICE_VENV)/interp-triton
$(DEVICE_INTERP_TRITON_DIR)/.installed: | $(DEVICE_VENV)/.installed $(VENV)/.installed
	$(DEVICE_VENV)/bin/python -m pip install --quiet --no-deps --target $(DEVICE_INTERP_TRITON_DIR) \
		"triton==$$($(PY) -c 'import triton; print(triton.__version__)')"
	touch $@

# (DEVICE_PYTEST_FLAGS: more pytest options for its runs, e.g. -x, as .ci/run passes)
DEVICE_PYTEST_FLAGS ?=
test-device-env: $(DEVICE_VENV)/.installed $(DEVICE_INTERP_TRITON_DIR)/.installed
	TRITON_INTERPRET=0 RESFAST_REQUIRE_CUDA_BUILD= $(DEVICE_VENV)/bin/python -m pytest tests -q -p no:cacheprovider $(DEVICE_PYTEST_FLAGS) \
		-n $(TEST_WORKERS) --dist loadscope --ignore tests/test_static_model.py \
		--deselect tests/test_build.py::test_info_reports_native_built \
		--deselect tests/test_build.py::test_required_cuda_build_has_cuda_kernels
	TRITON_INTERPRET=0 RESFAST_REQUIRE_CUDA_BUILD= $(DEVICE_VENV)/bin/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable $(DEVICE_PYTEST_FLAGS)
	PYTHONPATH=$(abspath $(DEVICE_INTERP_TRITON_DIR)) TRITON_INTERPRET=1 RESFAST_SANITIZE_OVERFLOW=1 $(DEVICE_VENV)/bin/python -m pytest \
		tests/test_opset.py tests/test_launch_counts.py tests/test_epilogue_stats.py tests/test_double_backward.py \
		tests/test_bn_relu_conv2d.py tests/test_triton_bwd_classes.py tests/test_plan_cache.py -q -p no:cacheprovider \
		-n $(TEST_WORKERS) $(DEVICE_PYTEST_FLAGS) \
		--dist loadscope

clean:
	rm -rf $(VENV) $(DEVICE_VENV) build *.egg-info resfast/_C*.so
