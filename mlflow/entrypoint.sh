#!/usr/bin/env bash
# Start the MLflow tracking server from environment variables (the mlflow image's entrypoint,
# docker/mlflow.Dockerfile). It waits for nothing: docker compose orders the start-up
# (depends_on: postgres healthy, minio-init completed).
#
# Required
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg://USER:PASSWORD@HOST:5432/mlflow
#                                 (read by `mlflow server` itself, so the password never
#                                 appears on a command line)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://BUCKET/mlflow (proxied: clients need only the tracking URI)
# S3 (MinIO or AWS), read by boto3 inside the server
#   MLFLOW_S3_ENDPOINT_URL        http(s)://minio:9000, never s3://...; unset for AWS S3
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
#   AWS_DEFAULT_REGION            default us-east-1
# Optional
#   MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (4)
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers accepted (MLflow's own variable); set it when
#                                 clients use a name such as mlflow:5000 or a public DNS name
# Basic auth: on when MLFLOW_AUTH_ADMIN_PASSWORD is set (12+ characters), which then needs
#   MLFLOW_FLASK_SERVER_SECRET_KEY  the same value on every server process and restart
#   MLFLOW_AUTH_DATABASE_URI        user store, e.g. postgresql+psycopg://.../mlflow_auth
#   MLFLOW_AUTH_CONFIG_TEMPLATE     default /etc/mlflow/basic_auth.ini (mlflow/basic_auth.ini)
# Debugging
#   MLFLOW_ENTRYPOINT_DRY_RUN=1   print the command (credentials masked) and exit; the rendered
#                                 auth config (mode 0600, under TMPDIR) is left for inspection
# Extra arguments given to the container are appended to `mlflow server`.
set -euo pipefail

die() { echo "mlflow-entrypoint: $*" >&2; exit 2; }

: "${MLFLOW_BACKEND_STORE_URI:?mlflow-entrypoint: set MLFLOW_BACKEND_STORE_URI (postgresql+psycopg://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?mlflow-entrypoint: set MLFLOW_ARTIFACTS_DESTINATION (s3://BUCKET/mlflow)}"
export MLFLOW_BACKEND_STORE_URI

case "${MLFLOW_S3_ENDPOINT_URL:-}" in
  "" | http://* | https://*) ;;
  *) die "MLFLOW_S3_ENDPOINT_URL must be an http(s) URL such as http://minio:9000, not '${MLFLOW_S3_ENDPOINT_URL}'" ;;
esac
if [[ "${MLFLOW_ARTIFACTS_DESTINATION}" == s3://* ]]; then
  export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
fi

PYTHON="${PYTHON:-python3}"
cmd=(mlflow server
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION}"
  --host "${MLFLOW_HOST:-0.0.0.0}"
  --port "${MLFLOW_PORT:-5000}"
  --workers "${MLFLOW_WORKERS:-4}")

if [[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]]; then
  (( ${#MLFLOW_AUTH_ADMIN_PASSWORD} >= 12 )) \
    || die "MLFLOW_AUTH_ADMIN_PASSWORD must have at least 12 characters"
  [[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]] \
    || die "basic auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (the same value for every worker)"
  [[ -n "${MLFLOW_AUTH_DATABASE_URI:-}" ]] \
    || die "basic auth needs MLFLOW_AUTH_DATABASE_URI (the user store)"
  template="${MLFLOW_AUTH_CONFIG_TEMPLATE:-/etc/mlflow/basic_auth.ini}"
  [[ -r "${template}" ]] || die "cannot read the auth config template ${template}"
  rendered_dir="$(umask 077 && mktemp -d)"
  # ${VAR} -> value; % doubled because mlflow reads the file with configparser interpolation.
  if ! (umask 077 && "${PYTHON}" - "${template}" > "${rendered_dir}/basic_auth.ini") <<'PY'
import os, re, sys

text = open(sys.argv[1], encoding="utf-8").read()
missing = []

def value(match):
    name = match.group(1)
    if name not in os.environ or not os.environ[name]:
        missing.append(name)
        return ""
    return os.environ[name].replace("%", "%%")

out = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value, text)
if missing:
    sys.exit("mlflow-entrypoint: the auth config needs " + ", ".join(sorted(set(missing))))
sys.stdout.write(out)
PY
  then
    rm -rf "${rendered_dir}"
    exit 2
  fi
  export MLFLOW_AUTH_CONFIG_PATH="${rendered_dir}/basic_auth.ini"
  export MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_AUTH_ADMIN_PASSWORD
  cmd+=(--app-name basic-auth)
fi

cmd+=("$@")

if [[ "${MLFLOW_ENTRYPOINT_DRY_RUN:-0}" == "1" ]]; then
  mask() { sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#g'; }
  echo "backend store: $(printf '%s' "${MLFLOW_BACKEND_STORE_URI}" | mask)"
  [[ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ]] && echo "auth config: ${MLFLOW_AUTH_CONFIG_PATH}"
  printf '%q ' "${cmd[@]}" | mask
  echo
  exit 0
fi

exec "${cmd[@]}"
