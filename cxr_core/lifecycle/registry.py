"""MLflow model registry: log the model, register only blessed models, list versions.
Promotion and rollback (alias moves with a comparison) live in :mod:`cxr_core.lifecycle.promotion`.

Aliases: ``challenger`` (newest version that passed its gates), ``champion`` (production),
``previous-champion`` (what ``rollback`` restores). Stages are not used (deprecated).
Only a version tagged ``cxr.gate_passed=true`` can ever become champion, even with --force.
"""

from __future__ import annotations

import hashlib
import posixpath
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_core.evaluation.external import EXTERNAL_TAG_PREFIX, SITE_THRESHOLD_TAG
from cxr_core.lifecycle.model_card import MODEL_CARD_ARTIFACT, with_registration

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS = "previous-champion"
MODEL_ARTIFACT = "model"
PREDICTIONS_ARTIFACT = "evaluation/test_predictions.csv"
GATE_TAG = "cxr.gate_passed"
GATE_FAILED_TAG = "cxr.gate_failed"  # comma-separated failed checks, or "none"
THRESHOLD_TAG = "cxr.threshold"
# Each version names its test images, so comparisons join on images both versions were tested
# on (never on another model's training data): where its per-image test predictions (sha256,
# label, probability) lie in its run, how many distinct images, and a digest of their hashes.
TEST_PREDICTIONS_TAG = "cxr.test_predictions"
TEST_IMAGES_TAG = "cxr.test_images"
TEST_SET_DIGEST_TAG = "cxr.test_set_digest"


@dataclass(frozen=True)
class VersionInfo:
    version: str
    aliases: list[str]
    run_id: str
    gate_passed: bool
    threshold: float | None
    metrics: dict[str, float]
    created: str
    external: dict[str, dict[str, float]] = field(default_factory=dict)  # set -> metric -> value
    site_threshold: float | None = None


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


MODEL_PURPOSE = ("Pneumonia vs normal classifier for pediatric AP chest X-rays (a screening aid, "
                 "not a diagnosis), trained, gated and registered by cxr.")
SUMMARY_ARTIFACT = "model_summary.md"  # written by cxr_core.lifecycle.tracking
PROMOTION_REPORT_TAG = "cxr.promotion_report"


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=MODEL_PURPOSE)
        except MlflowException:
            client.get_registered_model(name)  # created concurrently by another process


def _alias_line(client: Any, name: str, alias: str, version: str) -> str:
    mv = client.get_model_version(name, version)
    tags = mv.tags or {}
    shown = ", ".join(f"{k.removeprefix('cxr.metric.')} {v}" for k, v in sorted(tags.items())
                      if k.startswith("cxr.metric."))
    report = tags.get(PROMOTION_REPORT_TAG)
    return (f"- `{alias}`: version {version} (test {shown or 'metrics n/a'})"
            + (f"; promotion report `{report}`" if report else ""))


def describe_registered_model(client: Any, name: str) -> str:
    """Set the registered model's description: what it is for, which version holds which
    alias with its key test metrics, how versions move. Returns the description."""
    model = client.get_registered_model(name)
    order = {CHAMPION: 0, CHALLENGER: 1, PREVIOUS: 2}
    aliases = sorted((model.aliases or {}).items(), key=lambda kv: (order.get(kv[0], 9), kv[0]))
    lines = [_alias_line(client, name, alias, str(v)) for alias, v in aliases] or ["- none yet"]
    text = (f"{MODEL_PURPOSE}\n\n**Aliases**\n" + "\n".join(lines) +
            "\n\nA version is registered only when its gates pass (`cxr.gate_passed`); "
            "`cxr promote` compares the challenger with the champion on the test images both "
            "were scored on and logs the comparison report to the challenger's run.")
    client.update_registered_model(name, description=text)
    return text


def run_text(client: Any, run_id: str, path: str) -> str | None:
    """A text artifact of a run, or None when the run has none at ``path``."""
    if not _has_artifact(client, run_id, path):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_text()


def register_if_blessed(client: Any, name: str, run_id: str, decision: Any, threshold: float,
                        manifest_hash: str, metrics: dict[str, float],
                        extra_tags: dict[str, str] | None = None) -> str | None:
    """Register the run's model only when ``decision.passed``; give it the ``challenger``
    alias and version tags (threshold, gate results, manifest hash, key metrics, its test
    images, and ``extra_tags``: external metrics, a site threshold) and re-log its model card
    naming the version and aliases. A rejected model stays a logged run tagged with its
    decision. Returns the version or None."""
    client.set_tag(run_id, GATE_TAG, str(bool(decision.passed)).lower())
    client.set_tag(run_id, GATE_FAILED_TAG, gate_failed(decision))
    if not decision.passed:
        return None
    _ensure_registered_model(client, name)
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:  # a retried call: the version exists, finish its alias and card
        version = str(existing[0].version)
    else:
        tags = {**_version_tags(client, run_id, decision, threshold, manifest_hash, metrics),
                **(extra_tags or {})}
        # The version page shows the description: the model card's summary, not raw tags.
        description = run_text(client, run_id, SUMMARY_ARTIFACT) or decision.summary()
        version = str(client.create_model_version(
            name, source=f"runs:/{run_id}/{MODEL_ARTIFACT}", run_id=run_id, tags=tags,
            description=description).version)
    before = alias_version(client, name, CHALLENGER)
    _point_challenger(client, name, version)
    refresh_model_cards(client, name, [version, before.version if before else None])
    describe_registered_model(client, name)
    return version


def _version_tags(client: Any, run_id: str, decision: Any, threshold: float, manifest_hash: str,
                  metrics: dict[str, float]) -> dict[str, str]:
    tags = {  # short and filterable; the detail is in the run's gate_decision.md/.json
        GATE_TAG: "true",
        GATE_FAILED_TAG: gate_failed(decision),
        THRESHOLD_TAG: f"{threshold:.6f}",
        "cxr.manifest_hash": manifest_hash,
        "cxr.gate_champion": str(decision.champion_version or "none"),
        **{f"cxr.metric.{k}": f"{v:.4f}" for k, v in metrics.items()},
    }
    predictions = run_test_predictions(client, run_id)
    if predictions is not None:
        tags.update(describe_test_set(predictions, PREDICTIONS_ARTIFACT))
    return tags


def gate_failed(decision: Any) -> str:
    """The failed checks' names, comma-separated ("none" when all passed): a short tag."""
    return (",".join(c.name for c in decision.failed) or "none")[:250]


def describe_test_set(predictions: pd.DataFrame, artifact_path: str) -> dict[str, str]:
    """Version tags naming a test set: where its predictions lie, its size, its digest."""
    hashes = sorted(set(predictions["sha256"].astype(str)))
    return {TEST_PREDICTIONS_TAG: artifact_path, TEST_IMAGES_TAG: str(len(hashes)),
            TEST_SET_DIGEST_TAG: hashlib.sha256("\n".join(hashes).encode()).hexdigest()}


def _has_artifact(client: Any, run_id: str, path: str) -> bool:
    folder = posixpath.dirname(path)
    return path in {f.path for f in client.list_artifacts(run_id, folder or None)}


def run_test_predictions(client: Any, run_id: str,
                         path: str = PREDICTIONS_ARTIFACT) -> pd.DataFrame | None:
    """The per-image test predictions (sha256, label, probability, ...) a run logged, or None
    when it logged none."""
    if not _has_artifact(client, run_id, path):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_csv(client.download_artifacts(run_id, path, tmp))


def version_test_predictions(client: Any, mv: Any) -> pd.DataFrame | None:
    """The test predictions a registered version points at (its ``cxr.test_predictions`` tag;
    for versions registered before that tag, its run's standard artifact), with
    ``prediction`` at the version's own threshold. None when there are none."""
    tags = mv.tags or {}
    predictions = run_test_predictions(client, mv.run_id,
                                       tags.get(TEST_PREDICTIONS_TAG, PREDICTIONS_ARTIFACT))
    if predictions is None:
        return None
    threshold = float(tags.get(THRESHOLD_TAG, 0.5))
    return predictions.assign(prediction=(predictions["probability"] >= threshold).astype(int))


def refresh_model_card(client: Any, name: str, version: str) -> bool:
    """Re-log the model card of ``version``'s run so it names the version and its current
    aliases. False when the run has no card (e.g. a version registered by hand)."""
    mv = client.get_model_version(name, version)
    if not _has_artifact(client, mv.run_id, MODEL_CARD_ARTIFACT):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        card = Path(client.download_artifacts(mv.run_id, MODEL_CARD_ARTIFACT, tmp)).read_text()
    client.log_text(mv.run_id, with_registration(card, name, str(mv.version), mv.aliases or []),
                    MODEL_CARD_ARTIFACT)
    return True


def refresh_model_cards(client: Any, name: str, versions: Iterable[Any]) -> None:
    """:func:`refresh_model_card` for each version whose aliases changed (None skipped)."""
    for version in sorted({str(v) for v in versions if v is not None}, key=int):
        refresh_model_card(client, name, version)


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
    """Give the challenger alias to the newest version that passed its gates, ours or a
    newer one (two registrations at once: the newest stays the challenger whichever writes
    last). Checked again after writing: a registration that finished between our read and
    our write had created its version before, so the second look finds it."""
    for _ in range(3):
        target = max(int(version), _newest_blessed(client, name))
        current = alias_version(client, name, CHALLENGER)
        if current is not None and int(current.version) >= target:
            return
        _set_alias(client, name, CHALLENGER, str(target))


def _newest_blessed(client: Any, name: str) -> int:
    """The highest version number of ``name`` whose gates passed (0 when none)."""
    # The server filters and sorts: one row back however many versions the model has.
    newest = client.search_model_versions(
        f"name='{name}' and tag.`{GATE_TAG}` = 'true'", max_results=1,
        order_by=["version_number DESC"])
    return int(newest[0].version) if newest else 0


def _all_versions(client: Any, name: str, page_size: int = 1000) -> list[Any]:
    """Every version of ``name``, page by page (one search returns at most a page)."""
    out: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name='{name}'", max_results=page_size,
                                            page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version behind ``alias``, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def external_from_tags(tags: dict[str, str]) -> dict[str, dict[str, float]]:
    """Set name -> metric -> value from a version's ``cxr.external.<name>.<metric>`` tags."""
    out: dict[str, dict[str, float]] = {}
    for key, value in tags.items():
        if key.startswith(EXTERNAL_TAG_PREFIX):
            name, _, metric = key.removeprefix(EXTERNAL_TAG_PREFIX).rpartition(".")
            if name and metric:
                out.setdefault(name, {})[metric] = float(value)
    return out


def list_versions(client: Any, name: str) -> list[VersionInfo]:
    """Every version with its aliases, gate verdict, threshold and key metrics (newest first);
    [] when no model of that name is registered. Other errors (an unreachable or refusing
    server) are raised, not listed as an empty registry."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    aliases: dict[str, list[str]] = {}
    for alias, ver in (model.aliases or {}).items():
        aliases.setdefault(str(ver), []).append(alias)
    out = []
    for mv in _all_versions(client, name):
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
            external=external_from_tags(tags),
            site_threshold=float(tags[SITE_THRESHOLD_TAG]) if SITE_THRESHOLD_TAG in tags else None,
        ))
    return sorted(out, key=lambda v: int(v.version), reverse=True)
