"""MLflow model registry: log, register only blessed models, promote, roll back.

Aliases: ``challenger`` (newest version that passed its gates), ``champion`` (production),
``previous-champion`` (what ``rollback`` restores). Stages are not used (deprecated).
Only a version tagged ``cxr.gate_passed=true`` can ever become champion, even with --force.
"""

from __future__ import annotations

import getpass
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxr_core.errors import Rejection

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS = "previous-champion"
MODEL_ARTIFACT = "model"
PREDICTIONS_ARTIFACT = "evaluation/test_predictions.csv"
GATE_TAG = "cxr.gate_passed"
THRESHOLD_TAG = "cxr.threshold"


class PromotionRejected(Rejection):
    """The candidate may not become champion (gates failed, regression, nothing to promote)."""


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
    """Save the Keras model in the ``mlflow.keras`` flavor (signature, input example,
    requirements, the threshold file beside it) and upload it to the run. Returns the
    artifact URI of the model (``runs:/<run>/model``)."""
    import keras
    import mlflow.keras
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    model = keras.models.load_model(Path(model_dir) / "model.keras")
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, image_size, image_size, 1), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1), "pneumonia")]),
    )
    example = np.full((1, image_size, image_size, 1), 128.0, np.float32)
    import tensorflow as tf

    requirements = [f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / MODEL_ARTIFACT
        out.mkdir()  # the keras flavor writes into an existing folder
        mlflow.keras.save_model(model, str(out), signature=signature, input_example=example,
                                pip_requirements=requirements)
        for extra in ("threshold.json",):
            src = Path(model_dir) / extra
            if src.is_file():
                (out / extra).write_bytes(src.read_bytes())
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
    current = _alias_version(client, name, CHALLENGER)
    if current is not None and int(current.version) > int(version):
        return
    _set_alias(client, name, CHALLENGER, version)
    current = _alias_version(client, name, CHALLENGER)
    if current is not None and int(current.version) < int(version):
        _set_alias(client, name, CHALLENGER, version)  # an older writer landed last


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _test_predictions(client: Any, run_id: str) -> Any:
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_csv(client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, tmp))


@dataclass(frozen=True)
class PromotionResult:
    promoted_version: str
    previous_champion: str | None
    forced: bool
    comparison: dict[str, Any] | None


def compare_with_champion(client: Any, candidate: Any, champion: Any, alpha: float,
                          min_shared: int = 30) -> dict[str, Any]:
    """Paired comparison on the test images both versions were scored on (matched by
    sha256), each at its own threshold. Raises PromotionRejected if they share too few."""
    from cxr_core.gates import GateThresholds, decide, paired_comparison

    a = _test_predictions(client, candidate.run_id)
    b = _test_predictions(client, champion.run_id)
    joined = a.merge(b, on="sha256", suffixes=("_cand", "_champ"))
    if len(joined) < min_shared:
        raise PromotionRejected(
            f"version {candidate.version} and champion {champion.version} share only "
            f"{len(joined)} test images (need {min_shared}); evaluate both on the same test "
            "data, or promote with --force and a reason")
    y = joined["label_cand"].to_numpy(int)
    t_cand = float(candidate.tags.get(THRESHOLD_TAG, 0.5))
    t_champ = float(champion.tags.get(THRESHOLD_TAG, 0.5))
    cand_pred = (joined["probability_cand"].to_numpy() >= t_cand).astype(int)
    champ_pred = (joined["probability_champ"].to_numpy() >= t_champ).astype(int)
    comps = [paired_comparison(y, cand_pred, champ_pred, "all"),
             paired_comparison(y, cand_pred, champ_pred, "positives")]
    # Value gates were judged at registration; here only regression decides.
    decision = decide({}, GateThresholds(0.0, 0.0, False, alpha), comps, str(champion.version))
    regression = [c for c in decision.checks if c.name.startswith("no_")]
    return {
        "shared_images": int(len(joined)),
        "candidate_accuracy": float((cand_pred == y).mean()),
        "champion_accuracy": float((champ_pred == y).mean()),
        "candidate_recall": float(cand_pred[y == 1].mean()) if (y == 1).any() else None,
        "champion_recall": float(champ_pred[y == 1].mean()) if (y == 1).any() else None,
        "checks": [asdict(c) for c in regression],
        "passed": all(c.passed for c in regression),
    }


def promote(client: Any, name: str, version: str | None = None, force: bool = False,
            reason: str | None = None, alpha: float = 0.05, actor: str | None = None) -> PromotionResult:
    """Move ``champion`` to ``version`` (default: the challenger) after comparing it with the
    current champion; the old champion becomes ``previous-champion``.

    The champion alias is moved last, so a failure midway leaves the old champion in place.
    """
    if force and not reason:
        raise PromotionRejected("--force needs a reason (it is recorded on the version)")
    candidate = client.get_model_version(name, version) if version else _alias_version(
        client, name, CHALLENGER)
    if candidate is None:
        raise PromotionRejected(f"no version given and {name!r} has no '{CHALLENGER}' alias")
    if candidate.tags.get(GATE_TAG) != "true":
        raise PromotionRejected(
            f"version {candidate.version} did not pass its gates; it can never be champion")
    champion = _alias_version(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(candidate.version):
        raise PromotionRejected(f"version {candidate.version} is already the champion")
    comparison = None
    if champion is not None:
        try:
            comparison = compare_with_champion(client, candidate, champion, alpha)
        except PromotionRejected:
            if not force:
                raise
        if comparison is not None and not comparison["passed"] and not force:
            raise PromotionRejected(
                f"version {candidate.version} regresses significantly against champion "
                f"{champion.version}: {json.dumps(comparison['checks'])}")
    now = datetime.now(UTC).isoformat(timespec="seconds")
    audit = {
        "cxr.promoted_by": actor or getpass.getuser(),
        "cxr.promoted_at": now,
        "cxr.promotion_reason": reason or "passed champion comparison",
        "cxr.promotion_forced": str(force).lower(),
        "cxr.promotion_comparison": json.dumps(comparison)[:5000] if comparison else "none",
    }
    if champion is not None:
        _set_alias(client, name, PREVIOUS, champion.version)
    _set_alias(client, name, CHAMPION, candidate.version)  # the atomic switch
    for key, value in audit.items():
        client.set_model_version_tag(name, candidate.version, key, value)
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(candidate.version):
        client.delete_registered_model_alias(name, CHALLENGER)
    return PromotionResult(str(candidate.version), str(champion.version) if champion else None,
                           force, comparison)


def rollback(client: Any, name: str, reason: str | None = None, actor: str | None = None) -> PromotionResult:
    """Restore ``previous-champion`` as champion; the rolled-back version becomes
    ``previous-champion`` (so a rollback can itself be undone)."""
    previous = _alias_version(client, name, PREVIOUS)
    if previous is None:
        raise PromotionRejected(f"{name!r} has no '{PREVIOUS}' alias: nothing to roll back to")
    current = _alias_version(client, name, CHAMPION)
    _set_alias(client, name, CHAMPION, previous.version)
    if current is not None:
        _set_alias(client, name, PREVIOUS, current.version)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for key, value in {"cxr.rolled_back_by": actor or getpass.getuser(),
                       "cxr.rolled_back_at": now,
                       "cxr.rollback_reason": reason or "rollback",
                       "cxr.rollback_from": str(current.version) if current else "none"}.items():
        client.set_model_version_tag(name, previous.version, key, value)
    return PromotionResult(str(previous.version), str(current.version) if current else None,
                           False, None)


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
