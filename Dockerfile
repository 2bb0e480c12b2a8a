# splitserve image: slim Python, CPU torch by default, numeric non-root user.
#
#   docker build --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> -t splitserve:0.1.0 .
#   docker build --build-arg TORCH_SPEC="torch==2.13.0+cu128" \
#       --build-arg TORCH_INDEX_URL=<PyTorch's CUDA 12.8 wheel index> -t splitserve:0.1.0-cuda .
#
# TORCH_SPEC pins the build: "+cpu" is a CPU wheel wherever it comes from, so the default
# can never turn into a multi-GB CUDA image (the default index's Linux x86_64 torch is a
# CUDA build). TORCH_INDEX_URL, when set, is the only index torch comes from (PyTorch's
# CPU or CUDA wheel index, or a mirror); everything else comes from the default index.
# tests/ship/test_image_context.py runs these steps from the build context in CI.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC="torch==2.13.0+cpu"
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/splitserve
RUN if [ -n "$TORCH_INDEX_URL" ]; then set -- --index-url "$TORCH_INDEX_URL"; fi; \
    /opt/splitserve/bin/pip install "$@" "$TORCH_SPEC" \
    || { echo "no $TORCH_SPEC on this index: pass --build-arg TORCH_INDEX_URL=<a wheel index that has it> (README, Run it on Kubernetes)" >&2; exit 1; }
WORKDIR /src
COPY pyproject.toml README.md ./
COPY splitserve ./splitserve
COPY runtime ./runtime
COPY router ./router
COPY experiments ./experiments
# [otel]: the OpenTelemetry SDK, so OTEL_* variables a cluster injects turn tracing on
RUN /opt/splitserve/bin/pip install ".[otel]" && /opt/splitserve/bin/splitserve --version

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/splitserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/tmp TMPDIR=/tmp
COPY --from=build /opt/splitserve /opt/splitserve
# The tracked template; a ConfigMap mounted here replaces it on Kubernetes.
COPY configs/splitserve.example.yaml /etc/splitserve/splitserve.yaml
COPY model_repository /models
# Numeric ids, so Kubernetes' runAsNonRoot can verify them without /etc/passwd.
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["splitserve", "serve"]
CMD ["--host", "0.0.0.0", "--repository", "/models", "--config", "/etc/splitserve/splitserve.yaml"]
