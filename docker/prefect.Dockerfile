# syntax=docker/dockerfile:1.7
# Prefect server for cxr (API, UI, scheduler) on PostgreSQL. A small image of its own: the
# server needs none of the project's ML dependencies.
#
# Build context: the repository root:
#   docker build -f docker/prefect.Dockerfile -t cxr-prefect:latest .
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PREFECT_HOME=/var/lib/prefect \
    PREFECT_UI_STATIC_DIRECTORY=/var/lib/prefect/ui \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# Same pins as the project: prefect 3.9 does not install here; prefect 3.8 breaks with
# fastapi 0.151+ (422 on every /filter endpoint, then import errors); with SQLAlchemy 2.1 its
# scheduler fails ("Can't evaluate bulk DML statement") and schedules never create runs. asyncpg is the driver
# of PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "prefect>=3.8,<3.9" "fastapi>=0.139,<0.151" "asyncpg>=0.29" \
      "sqlalchemy>=2.0,<2.1"

# The UI is rendered into PREFECT_UI_STATIC_DIRECTORY at start-up (with the API URL the
# browser should use), so it must be writable by the unprivileged user.
RUN groupadd --system --gid 10003 prefect \
 && useradd --system --uid 10003 --gid prefect --home-dir /var/lib/prefect --create-home \
      --shell /usr/sbin/nologin prefect

USER 10003:10003
WORKDIR /var/lib/prefect
EXPOSE 4200

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:4200/api/health', timeout=4)"]

CMD ["prefect", "server", "start", "--host", "0.0.0.0", "--port", "4200"]
