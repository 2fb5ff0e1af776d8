"""S3-compatible storage for a run's data artifacts (manifest, validation report,
augmentation lineage), through boto3. Credentials come from the environment (AWS_* or the
CXR_S3_* secrets) and are never logged."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cxr_core.errors import TransientIOError, is_transient


def s3_client(endpoint_url: str | None, access_key_id: str | None = None,
              secret_access_key: str | None = None, region: str = "us-east-1") -> Any:
    """A boto3 S3 client; without explicit keys boto3's own chain (AWS_* env, profiles)
    applies. Few, short retries: the orchestrator retries transient failures itself."""
    import boto3
    from botocore.config import Config

    kwargs: dict[str, Any] = {"region_name": region, "config": Config(
        retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=30)}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if access_key_id and secret_access_key:
        kwargs["aws_access_key_id"] = access_key_id
        kwargs["aws_secret_access_key"] = secret_access_key
    return boto3.client("s3", **kwargs)


def client_from_settings(settings: Any) -> Any:
    """The S3 client the settings describe (secrets unwrapped only here)."""
    key = settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None
    secret = (settings.s3_secret_access_key.get_secret_value()
              if settings.s3_secret_access_key else None)
    return s3_client(settings.s3_endpoint_url, key, secret)


def ensure_bucket(client: Any, bucket: str) -> bool:
    """Create ``bucket`` on first use; returns True when it had to be created."""
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code not in ("404", "NoSuchBucket", "NotFound"):
            if is_transient(exc):
                raise TransientIOError(f"s3://{bucket}: {exc}") from exc
            raise
    except Exception as exc:  # noqa: BLE001 - classified below
        if is_transient(exc):
            raise TransientIOError(f"s3://{bucket}: {exc}") from exc
        raise
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",
                                                               "BucketAlreadyExists"):
            raise
    return True


def upload_files(client: Any, bucket: str, prefix: str, root: Path,
                 files: Iterable[Path]) -> list[str]:
    """Upload files under ``root`` to ``s3://bucket/prefix/<relative path>``; returns URIs.
    Connection failures become TransientIOError (retried by the orchestrator)."""
    uris = []
    for path in files:
        key = f"{prefix.strip('/')}/{Path(path).relative_to(root).as_posix()}".lstrip("/")
        try:
            client.upload_file(str(path), bucket, key)
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_transient(exc):
                raise TransientIOError(f"upload of {path} to s3://{bucket}/{key}: {exc}") from exc
            raise
        uris.append(f"s3://{bucket}/{key}")
    return uris


def run_data_files(run_dir: Path) -> list[Path]:
    """The data artifacts of a run: manifest, validation report (JSON, quarantine, Data
    Docs), augmentation lineage. Augmented images stay local (they are reproducible)."""
    run_dir = Path(run_dir)
    files = [run_dir / "manifest.parquet", run_dir / "augmentation_lineage.csv"]
    files += sorted(p for p in (run_dir / "validation").rglob("*") if p.is_file())
    return [f for f in files if f.is_file()]


def upload_run_data(client: Any, bucket: str, prefix: str, run_dir: Path) -> list[str]:
    """Bootstrap the bucket and upload the run's data artifacts under prefix/runs/<run>/."""
    ensure_bucket(client, bucket)
    run_dir = Path(run_dir)
    return upload_files(client, bucket, f"{prefix.strip('/')}/runs/{run_dir.name}", run_dir,
                        run_data_files(run_dir))
