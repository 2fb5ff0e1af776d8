"""Promotion: compare a candidate with the champion on shared test images, move the aliases,
record who, when and why; and rollback.

Only a version tagged ``cxr.gate_passed=true`` can ever become champion, even with --force.
"""

from __future__ import annotations

import getpass
import json
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_core.errors import Rejection
from cxr_core.evaluation.gates import GateThresholds, decide, paired_comparison
from cxr_core.evaluation.scoring import score_test_split, test_split
from cxr_core.lifecycle.predict import load_model
from cxr_core.lifecycle.registry import (
    CHALLENGER,
    CHAMPION,
    GATE_TAG,
    PREDICTIONS_ARTIFACT,
    PREVIOUS,
    THRESHOLD_TAG,
    _set_alias,
    alias_version,
)


class PromotionRejected(Rejection):
    """The candidate may not become champion (gates failed, regression, nothing to promote)."""


@dataclass(frozen=True)
class PromotionResult:
    promoted_version: str
    previous_champion: str | None
    forced: bool
    comparison: dict[str, Any] | None


def _test_predictions(client: Any, run_id: str) -> Any:
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_csv(client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, tmp))


def compare_with_champion(client: Any, candidate: Any, champion: Any, alpha: float,
                          min_shared: int = 30) -> dict[str, Any]:
    """Paired comparison on the test images both versions were scored on (matched by
    sha256), each at its own threshold. Raises PromotionRejected if they share too few."""
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
    candidate = client.get_model_version(name, version) if version else alias_version(
        client, name, CHALLENGER)
    if candidate is None:
        raise PromotionRejected(f"no version given and {name!r} has no '{CHALLENGER}' alias")
    if candidate.tags.get(GATE_TAG) != "true":
        raise PromotionRejected(
            f"version {candidate.version} did not pass its gates; it can never be champion")
    champion = alias_version(client, name, CHAMPION)
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
    challenger = alias_version(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(candidate.version):
        client.delete_registered_model_alias(name, CHALLENGER)
    return PromotionResult(str(candidate.version), str(champion.version) if champion else None,
                           force, comparison)


def rollback(client: Any, name: str, reason: str | None = None, actor: str | None = None) -> PromotionResult:
    """Restore ``previous-champion`` as champion; the rolled-back version becomes
    ``previous-champion`` (so a rollback can itself be undone)."""
    previous = alias_version(client, name, PREVIOUS)
    if previous is None:
        raise PromotionRejected(f"{name!r} has no '{PREVIOUS}' alias: nothing to roll back to")
    current = alias_version(client, name, CHAMPION)
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


def champion_comparisons(client: Any, model_name: str, manifest_path: Path, image_size: int,
                         candidate_predictions: Path) -> tuple[list[Any] | None, str | None]:
    """Score the current champion on this run's test images and compare (McNemar). Returns
    (None, None) when there is no champion."""
    champion = alias_version(client, model_name, CHAMPION)
    if champion is None:
        return None, None
    loaded = load_model(f"models:/{model_name}@{CHAMPION}", client.tracking_uri)
    test = test_split(manifest_path)
    champ = score_test_split(loaded.model, loaded.threshold, loaded.image_size, test)
    cand = pd.read_csv(candidate_predictions)
    y = cand["label"].to_numpy(int)
    return ([paired_comparison(y, cand["prediction"].to_numpy(), champ["prediction"].to_numpy(), s)
             for s in ("all", "positives")], str(champion.version))
