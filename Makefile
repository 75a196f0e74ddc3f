# clip3d: `make demo` runs the demo, `make test` runs the tests. Both create .venv on first use.
#
# Variables:
#   PYTHON   interpreter used to create the venv (default: python3)
#   CUDA     empty (default) = CPU install: torch==2.13.0 CPU wheel + the CPU `spconv` package.
#            cu120 | cu121 | cu124 | cu126 = GPU install: the CUDA torch build from your index and the
#            matching `spconv-cuXXX` wheel (same import name as `spconv`), e.g. `make CUDA=cu126 test`.
#   GPU      triton = GPU install on any CUDA torch that ships Triton (any CUDA version, Jetson too):
#            `spconv-triton` runs the sparse convs on the GPU, the CPU `spconv` on CPU, e.g.
#            `make GPU=triton test`. The backend is chosen per run (CLIP3D_SPARSE_BACKEND, README).
#   GPU_CHECK_OUT folder of `make gpu-check` (default: outputs/gpu_check)
#   VENV     venv folder (default: .venv)
#   DEMO_OUT demo output folder (default: demo_output)
#   DEMO_PANOPTIC_OUT output folder of `make demo-panoptic` (default: demo_output_panoptic)
#   DEMO_ARGS extra demo arguments, e.g. DEMO_ARGS="--checkpoint model.pt" (python -m clip3d_ros.demo --help)
#   PYTEST_ARGS extra pytest arguments

PYTHON ?= python3
CUDA ?=
GPU ?=
VENV ?= .venv
GPU_CHECK_OUT ?= outputs/gpu_check
DEMO_OUT ?= demo_output
DEMO_PANOPTIC_OUT ?= demo_output_panoptic
DEMO_ARGS ?=
PYTEST_ARGS ?=
DEVKIT := nuscenes-devkit==1.2.0

ifneq ($(filter-out triton,$(GPU)),)
$(error GPU=$(GPU): only GPU=triton is known (CUDA=cuXXX picks a spconv CUDA build))
endif
ifneq ($(and $(GPU),$(CUDA)),)
$(error give GPU=triton or CUDA=cuXXX, not both)
endif
SPCONV_EXTRA := $(or $(GPU),$(CUDA),cpu)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(SPCONV_EXTRA)

# Every process that starts rclpy stays on loopback with its own domain (DEVELOPERS.md).
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= 42
export RMW_IMPLEMENTATION ?= rmw_fastrtps_cpp
export FASTDDS_DEFAULT_PROFILES_FILE ?= $(CURDIR)/config/fastdds_loopback.xml

.PHONY: venv test demo demo-panoptic lint bench gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 torchvision==0.28.0
	$(BIN)/pip install -q -e ".[$(SPCONV_EXTRA),ros,dev]"
	# tests only: the PQ reference (PanopticEval, pure numpy); --no-deps as its pins (numpy<2, opencv)
	# would downgrade the venv, and the tests load the evaluator file without the package __init__
	$(BIN)/pip install -q --no-deps $(DEVKIT)
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m clip3d_ros.demo --out $(DEMO_OUT) $(DEMO_ARGS)

# The demo with an open-vocabulary panoptic model: instance boxes in the bird's-eye pictures.
demo-panoptic: $(STAMP)
	$(BIN)/python -m clip3d_ros.demo --out $(DEMO_PANOPTIC_OUT) \
	  --train-config training/synthetic_panoptic_demo.yaml $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check clip3d_core clip3d_ros tests launch training benchmarks setup.py

bench: $(STAMP)
	$(BIN)/clip3d bench

# The prepared GPU check (benchmarks/gpu/check.sh): gpu tests + bench matrix, under 8 minutes.
gpu-check: $(STAMP)
	PYTHON=$(BIN)/python bash benchmarks/gpu/check.sh --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_PANOPTIC_OUT) build *.egg-info
