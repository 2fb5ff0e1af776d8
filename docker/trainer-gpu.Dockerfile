# syntax=docker/dockerfile:1.7
# cxr trainer image, GPU build: same layout as trainer.Dockerfile, with the `gpu` extra
# (tensorflow[and-cuda]) instead of `cpu`. Runs the Keras Tuner workers (tune-worker
# deployment, `gpu` work pool): in infra/docker-compose.yml (service worker-gpu) or as
# Kubernetes jobs (infra/k8s/gpu-work-pool.json).
#
# Build context: the repository root:
#   docker build -f docker/trainer-gpu.Dockerfile -t cxr-trainer-gpu:latest .
#
# Base image: python:3.11-slim, not nvidia/cuda:12.x-cudnn-runtime-ubuntu22.04. The and-cuda
# extra installs CUDA, cuDNN, cuBLAS, NCCL and ptxas as pip wheels (nvidia-*-cu12) that
# TensorFlow loads from site-packages, so a CUDA base image would only add a second, possibly
# mismatched, copy of the same libraries (several GB) and would need Python 3.11 installed
# on top of Ubuntu 22.04's 3.10. The host supplies only the NVIDIA driver, injected at run time
# by the NVIDIA Container Toolkit (Docker) or the NVIDIA device plugin (Kubernetes).
#
# Host requirement: an NVIDIA driver for CUDA 12 (Linux driver >= 525.60.13; >= 550 recommended
# for the CUDA 12.x wheels TensorFlow 2.21 pulls in), plus the NVIDIA Container Toolkit (Docker)
# or the NVIDIA device plugin (Kubernetes). NVIDIA_REQUIRE_CUDA makes the toolkit refuse to
# start the container on an older driver instead of failing inside TensorFlow.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.description="cxr GPU trainer (TensorFlow 2.21, CUDA 12 wheels)" \
      com.nvidia.cuda.required="cuda>=12.0" \
      com.nvidia.driver.min-version="525.60.13"

# NVIDIA_*: what the nvidia/cuda images set (which GPUs and driver parts the toolkit mounts
# in; the Kubernetes device plugin and `docker run --gpus` override the device list).
# TF_FORCE_GPU_ALLOW_GROWTH: allocate GPU memory as needed instead of all of it up front.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    CXR_HOME=/var/lib/cxr \
    GX_ANALYTICS_ENABLED=false \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=12.0" \
    TF_FORCE_GPU_ALLOW_GROWTH=true

RUN groupadd --system --gid 10001 cxr \
 && useradd --system --uid 10001 --gid cxr --home-dir /home/cxr --create-home \
      --shell /usr/sbin/nologin cxr \
 && install -d -o cxr -g cxr -m 0750 /var/lib/cxr

WORKDIR /opt/cxr

# 1) Dependencies only (tensorflow[and-cuda] and its CUDA wheels), cached until
#    pyproject.toml changes.
#    README.md is not copied here (pyproject's readme gets an empty stand-in), so editing the
#    docs does not reinstall TensorFlow.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p cxr_core flows \
 && touch cxr_core/__init__.py flows/__init__.py README.md \
 && pip install ".[gpu]" \
 && pip uninstall -y cxr \
 && rm -rf cxr_core flows build ./*.egg-info README.md

# 2) The project itself.
COPY cxr_core ./cxr_core
COPY flows ./flows
COPY prefect.yaml README.md ./
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf build ./*.egg-info \
 && cxr --help > /dev/null

# Numeric, so that Kubernetes can enforce runAsNonRoot (infra/k8s/gpu-work-pool.json).
USER 10001:10001

# Check the GPU from inside a container:
#   docker run --rm --gpus all --entrypoint python cxr-trainer-gpu:latest \
#     -c "import tensorflow as tf; print(tf.config.list_physical_devices('GPU'))"
ENTRYPOINT ["cxr"]
CMD ["--help"]
