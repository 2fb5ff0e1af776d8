# syntax=docker/dockerfile:1.7
# cxr trainer image, CPU build: the `cxr` CLI plus the Prefect flows, run by the `cpu` work
# pool's process worker (infra/docker-compose.yml, service worker-cpu).
#
# Build context: the repository root (the .dockerignore there keeps .venv, .cxr, data, mlruns
# and *.db out of it):
#   docker build -f docker/trainer.Dockerfile -t cxr-trainer:latest .
#
# The repository lives at /opt/cxr: prefect.yaml's pull step sets that working directory and
# the deployments' entrypoints (flows/<file>.py:<function>) are resolved from it.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    CXR_HOME=/var/lib/cxr \
    GX_ANALYTICS_ENABLED=false \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

# Unprivileged runtime user; the only writable places are its home and the state home.
RUN groupadd --system --gid 10001 cxr \
 && useradd --system --uid 10001 --gid cxr --home-dir /home/cxr --create-home \
      --shell /usr/sbin/nologin cxr \
 && install -d -o cxr -g cxr -m 0750 /var/lib/cxr

WORKDIR /opt/cxr

# 1) Dependencies only, cached until pyproject.toml changes: empty stand-in packages let pip
#    resolve and install the `cpu` extra (tensorflow-cpu) without the source tree.
#    README.md is not copied here (pyproject's readme gets an empty stand-in), so editing the
#    docs does not reinstall TensorFlow.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p cxr_core flows \
 && touch cxr_core/__init__.py flows/__init__.py README.md \
 && pip install ".[cpu]" \
 && pip uninstall -y cxr \
 && rm -rf cxr_core flows build ./*.egg-info README.md

# 2) The project itself (no dependency changes possible here: --no-deps).
COPY cxr_core ./cxr_core
COPY flows ./flows
COPY prefect.yaml README.md ./
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf build ./*.egg-info \
 && cxr --help > /dev/null

# Numeric, so that Kubernetes can enforce runAsNonRoot (infra/k8s/gpu-work-pool.json).
USER 10001:10001

# `docker run cxr-trainer run --data-dir /data`, `... tune worker ...`, `... predict ...`.
# Workers override the entrypoint with `prefect worker start ...` (see docker-compose.yml).
ENTRYPOINT ["cxr"]
CMD ["--help"]
