# splitserve image: slim Python, CPU torch by default, numeric non-root user.
#
#   docker build -t splitserve:0.1.0 .
#   docker build -t splitserve:0.1.0-cuda --build-arg TORCH_SPEC="torch==2.13.0" \
#       --build-arg TORCH_INDEX_URL=<your CUDA wheel index> .
#
# TORCH_INDEX_URL, when set, is the only index torch is installed from (a CPU or a CUDA
# wheel index, or a local mirror); everything else comes from the default index.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/splitserve
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        /opt/splitserve/bin/pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    else \
        /opt/splitserve/bin/pip install "$TORCH_SPEC"; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY router ./router
COPY runtime ./runtime
# [otel]: the OpenTelemetry SDK, so OTEL_* variables a cluster injects turn tracing on
RUN /opt/splitserve/bin/pip install ".[otel]"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/splitserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/tmp TMPDIR=/tmp
COPY --from=build /opt/splitserve /opt/splitserve
COPY configs/splitserve.yaml /etc/splitserve/splitserve.yaml
COPY model_repository /models
# Numeric ids, so Kubernetes' runAsNonRoot can verify them without /etc/passwd.
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["splitserve", "serve"]
CMD ["--host", "0.0.0.0", "--repository", "/models", "--config", "/etc/splitserve/splitserve.yaml"]
