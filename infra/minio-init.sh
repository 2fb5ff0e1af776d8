#!/bin/sh
# One-shot MinIO bootstrap (service minio-init in infra/docker-compose.yml, run with the mc
# image). Idempotent: safe on every `docker compose up`.
#   1. the bucket CXR_S3_BUCKET (MLflow artifacts under s3://BUCKET/mlflow, run data under
#      s3://BUCKET/CXR_S3_PREFIX/runs/...)
#   2. a policy `cxr-bucket-rw` limited to that bucket
#   3. the service account S3_ACCESS_KEY_ID / S3_SECRET_ACCESS_KEY with that policy, used by
#      the MLflow server and the workers (the MinIO root user stays with the operator)
set -eu

: "${MINIO_ROOT_USER:?set MINIO_ROOT_USER}"
: "${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD}"
: "${CXR_S3_BUCKET:?set CXR_S3_BUCKET}"
: "${S3_ACCESS_KEY_ID:?set S3_ACCESS_KEY_ID}"
: "${S3_SECRET_ACCESS_KEY:?set S3_SECRET_ACCESS_KEY}"
MINIO_URL="${MINIO_URL:-http://minio:9000}"

# MINIO_URL answers before the health check passes on slow disks: retry the alias briefly.
i=0
until mc alias set cxr "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null; do
  i=$((i + 1))
  [ "$i" -lt 30 ] || { echo "minio-init: $MINIO_URL does not answer" >&2; exit 1; }
  sleep 2
done

mc mb --ignore-existing "cxr/$CXR_S3_BUCKET"

# Shell built-ins only from here on (the mc image is minimal): printf writes the policy.
policy_file=/tmp/cxr-bucket-rw.json
printf '%s\n' "{
  \"Version\": \"2012-10-17\",
  \"Statement\": [
    {
      \"Effect\": \"Allow\",
      \"Action\": [\"s3:GetBucketLocation\", \"s3:ListBucket\", \"s3:ListBucketMultipartUploads\"],
      \"Resource\": [\"arn:aws:s3:::$CXR_S3_BUCKET\"]
    },
    {
      \"Effect\": \"Allow\",
      \"Action\": [\"s3:GetObject\", \"s3:PutObject\", \"s3:DeleteObject\",
                 \"s3:AbortMultipartUpload\", \"s3:ListMultipartUploadParts\"],
      \"Resource\": [\"arn:aws:s3:::$CXR_S3_BUCKET/*\"]
    }
  ]
}" > "$policy_file"

# `policy create` replaces a policy of the same name; `user add` resets an existing user's
# secret key to the configured one; the policy is attached only once.
mc admin policy create cxr cxr-bucket-rw "$policy_file"
mc admin user add cxr "$S3_ACCESS_KEY_ID" "$S3_SECRET_ACCESS_KEY"
info="$(mc admin user info cxr "$S3_ACCESS_KEY_ID")"
case "$info" in
  *cxr-bucket-rw*) ;;
  *) mc admin policy attach cxr cxr-bucket-rw --user "$S3_ACCESS_KEY_ID" ;;
esac
echo "minio-init: bucket $CXR_S3_BUCKET and user $S3_ACCESS_KEY_ID ready"
