# syntax=docker/dockerfile:1.7
# GPU worker, single-container shape: vLLM's engine runs inside the Breakwater worker
# (`--engine vllm`). From the repository root:
#   docker build -f deploy/docker/worker-vllm.Dockerfile -t breakwater-worker-vllm:0.1.0 .
# The base is vLLM's own CUDA image, so torch, CUDA and vLLM match as vLLM released them.
FROM vllm/vllm-openai:v0.11.0

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 HOME=/tmp HF_HOME=/models HF_HUB_OFFLINE=1
WORKDIR /opt/breakwater
COPY pyproject.toml README.md ./
COPY src ./src
# vLLM and torch come from the base image; llama-cpp-python is a core dependency, built portable.
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF" pip install ".[vllm]" \
 && rm -rf /opt/breakwater/src \
 && groupadd --system --gid 10001 breakwater \
 && useradd --system --uid 10001 --gid breakwater --home-dir /nonexistent --shell /usr/sbin/nologin breakwater
USER 10001:10001
ENV BREAKWATER_METRICS_PORT=9400 BREAKWATER_METRICS_HOST=0.0.0.0
EXPOSE 9400
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["breakwater"]
CMD ["worker", "--engine", "vllm"]
