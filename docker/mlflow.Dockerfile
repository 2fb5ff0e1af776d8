# syntax=docker/dockerfile:1.7
# MLflow tracking server for cxr: PostgreSQL backend (psycopg 3), proxied S3 artifacts
# (MinIO or AWS S3, through boto3), optional basic auth. Configuration is read from the
# environment by mlflow/entrypoint.sh; see mlflow/README.md and infra/docker-compose.yml.
#
# Build context: the repository root:
#   docker build -f docker/mlflow.Dockerfile -t cxr-mlflow:latest .
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Same pins as the project (pyproject.toml, ../shared/STACK.md): mlflow 3.18 does not install
# with its mlflow-skinny; fastapi 0.151+ is unverified with this stack.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install \
      "mlflow[auth]>=3.17,<3.18" \
      "psycopg[binary]>=3.1" \
      "boto3>=1.34" \
      "fastapi>=0.139,<0.151"

RUN groupadd --system --gid 10002 mlflow \
 && useradd --system --uid 10002 --gid mlflow --home-dir /home/mlflow --create-home \
      --shell /usr/sbin/nologin mlflow

COPY --chmod=0755 mlflow/entrypoint.sh /usr/local/bin/mlflow-entrypoint
COPY --chmod=0644 mlflow/basic_auth.ini /etc/mlflow/basic_auth.ini

USER 10002:10002
WORKDIR /home/mlflow
EXPOSE 5000

# /health answers without credentials, also with basic auth on. No curl in the slim image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MLFLOW_PORT', '5000'), timeout=4)"]

ENTRYPOINT ["mlflow-entrypoint"]
