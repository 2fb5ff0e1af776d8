"""MLflow model registry: log the model, register only blessed models, list versions.
Promotion and rollback (alias moves with a comparison) live in :mod:`cxr_core.lifecycle.promotion`.

Aliases: ``challenger`` (newest version that passed its gates), ``champion`` (production),
``previous-champion`` (what ``rollback`` restores). Stages are not used (deprecated).
Only a version tagged ``cxr.gate_passed=true`` can ever become champion, even with --force.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS = "previous-champion"
MODEL_ARTIFACT = "model"
PREDICTIONS_ARTIFACT = "evaluation/test_predictions.csv"
GATE_TAG = "cxr.gate_passed"
THRESHOLD_TAG = "cxr.threshold"


@dataclass(frozen=True)
class VersionInfo:
    version: str
    aliases: list[str]
    run_id: str
    gate_passed: bool
    threshold: float | None
    metrics: dict[str, float]
    created: str


def log_keras_model(client: Any, run_id: str, model_dir: Path, image_size: int) -> str:
    """Save the Keras model in the ``mlflow.keras`` flavor with an image-native pyfunc
    flavor (encoded images in, probability/label/threshold out), requirements, and the
    threshold file and drift reference beside it (see
    :func:`cxr_core.lifecycle.serving.write_model_folder`), and upload it to the run.
    Returns the artifact URI of the model (``runs:/<run>/model``)."""
    from cxr_core.lifecycle.serving import write_model_folder

    with tempfile.TemporaryDirectory() as tmp:
        out = write_model_folder(Path(model_dir), Path(tmp) / MODEL_ARTIFACT)
        client.log_artifacts(run_id, str(out), MODEL_ARTIFACT)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="Pneumonia vs normal classifier for pediatric AP chest X-rays "
                "(a screening aid, not a diagnosis).")
        except MlflowException:
            client.get_registered_model(name)  # created concurrently by another process


def register_if_blessed(client: Any, name: str, run_id: str, decision: Any, threshold: float,
                        manifest_hash: str, metrics: dict[str, float]) -> str | None:
    """Register the run's model only when ``decision.passed``; give it the ``challenger``
    alias and version tags (threshold, gate results, manifest hash, key metrics). A rejected
    model stays a logged run tagged with its decision. Returns the version or None."""
    client.set_tag(run_id, GATE_TAG, str(bool(decision.passed)).lower())
    client.set_tag(run_id, "cxr.gate_decision", json.dumps(decision.to_dict())[:5000])
    if not decision.passed:
        return None
    _ensure_registered_model(client, name)
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:  # a retried call: the version exists, finish its alias and stop
        version = str(existing[0].version)
        _point_challenger(client, name, version)
        return version
    tags = {
        GATE_TAG: "true",
        THRESHOLD_TAG: f"{threshold:.6f}",
        "cxr.manifest_hash": manifest_hash,
        "cxr.gate_decision": json.dumps(decision.to_dict())[:5000],
        **{f"cxr.metric.{k}": f"{v:.4f}" for k, v in metrics.items()},
    }
    mv = client.create_model_version(name, source=f"runs:/{run_id}/{MODEL_ARTIFACT}",
                                     run_id=run_id, tags=tags)
    _point_challenger(client, name, str(mv.version))
    return str(mv.version)


_PERMANENT_ERRORS = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "PERMISSION_DENIED",
                     "UNAUTHENTICATED"}


def _set_alias(client: Any, name: str, alias: str, version: str, attempts: int = 6) -> None:
    """Set an alias, retrying a conflicting write: MLflow's SQL store checks then inserts,
    so two processes aliasing the same model at once can collide on the unique key."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as exc:
            if exc.error_code in _PERMANENT_ERRORS or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)


def _point_challenger(client: Any, name: str, version: str) -> None:
    """Give ``version`` the challenger alias unless a newer version already holds it
    (two registrations at once: the newest one stays the challenger)."""
    current = alias_version(client, name, CHALLENGER)
    if current is not None and int(current.version) > int(version):
        return
    _set_alias(client, name, CHALLENGER, version)
    current = alias_version(client, name, CHALLENGER)
    if current is not None and int(current.version) < int(version):
        _set_alias(client, name, CHALLENGER, version)  # an older writer landed last


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version behind ``alias``, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def list_versions(client: Any, name: str) -> list[VersionInfo]:
    """Every version with its aliases, gate verdict, threshold and key metrics (newest first)."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return []
    aliases: dict[str, list[str]] = {}
    for alias, ver in (model.aliases or {}).items():
        aliases.setdefault(str(ver), []).append(alias)
    out = []
    for mv in client.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        out.append(VersionInfo(
            version=str(mv.version),
            aliases=sorted(aliases.get(str(mv.version), [])),
            run_id=mv.run_id,
            gate_passed=tags.get(GATE_TAG) == "true",
            threshold=float(tags[THRESHOLD_TAG]) if THRESHOLD_TAG in tags else None,
            metrics={k.removeprefix("cxr.metric."): float(v) for k, v in tags.items()
                     if k.startswith("cxr.metric.")},
            created=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(
                timespec="seconds"),
        ))
    return sorted(out, key=lambda v: int(v.version), reverse=True)
