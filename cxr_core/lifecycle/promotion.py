"""Promotion: compare a candidate with the champion on shared test images, move the aliases,
record who, when and why; and rollback.

Only a version tagged ``cxr.gate_passed=true`` can ever become champion, even with --force.
"""

from __future__ import annotations

import getpass
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_core.errors import Rejection
from cxr_core.evaluation.gates import ChampionComparison, GateThresholds, decide, paired_comparison
from cxr_core.lifecycle.registry import (
    CHALLENGER,
    CHAMPION,
    GATE_TAG,
    PREVIOUS,
    PROMOTION_REPORT_TAG,
    THRESHOLD_TAG,
    _set_alias,
    alias_version,
    describe_registered_model,
    refresh_model_cards,
    version_test_predictions,
)

# Fewer shared test images than this and McNemar says little: the comparison is skipped.
MIN_SHARED_TEST_IMAGES = 30


class PromotionRejected(Rejection):
    """The candidate may not become champion (gates failed, regression, nothing to promote)."""


@dataclass(frozen=True)
class PromotionResult:
    promoted_version: str
    previous_champion: str | None
    forced: bool
    comparison: dict[str, Any] | None


def shared_test_images(candidate: pd.DataFrame, champion: pd.DataFrame) -> pd.DataFrame:
    """The images both models were tested on, joined by sha256: ``label`` (the candidate's,
    i.e. the current labelling), ``patient_id`` (the candidate's, when its predictions carry
    one), ``prediction_cand``, ``prediction_champ``. Any image either model trained or
    validated on is left out, whatever its path or the split carving."""
    keep = [c for c in ("sha256", "label", "patient_id") if c in candidate]
    cand = candidate.drop_duplicates("sha256")[[*keep, "prediction"]]
    champ = champion.drop_duplicates("sha256")[["sha256", "prediction"]]
    return cand.merge(champ, on="sha256", suffixes=("_cand", "_champ"))


def compare_on_shared(joined: pd.DataFrame, champion_version: str,
                      min_shared: int = MIN_SHARED_TEST_IMAGES) -> ChampionComparison:
    """McNemar on all shared images and on the shared positives, patients as the unit when
    ``joined`` has a ``patient_id`` column (:func:`paired_comparison`); skipped (with the
    reason) when fewer than ``min_shared`` images are shared."""
    n = len(joined)
    if n < min_shared:
        return ChampionComparison(
            champion_version, n, (), f"comparison with champion version {champion_version} "
            f"skipped: {n} shared test images < {min_shared}")
    y = joined["label"].to_numpy(int)
    cand, champ = joined["prediction_cand"].to_numpy(int), joined["prediction_champ"].to_numpy(int)
    groups = joined["patient_id"].to_numpy(object) if "patient_id" in joined else None
    return ChampionComparison(champion_version, n, tuple(
        paired_comparison(y, cand, champ, subset, groups) for subset in ("all", "positives")))


def champion_comparison(client: Any, model_name: str, candidate_predictions: Path,
                        min_shared: int = MIN_SHARED_TEST_IMAGES) -> ChampionComparison | None:
    """Compare a new candidate (its per-image test predictions file, not yet registered) with
    the current champion on the test images both were tested on, using the predictions the
    champion recorded at its registration (never re-scoring it on this run's split, part of
    which may have been its training data). None when there is no champion."""
    champion = alias_version(client, model_name, CHAMPION)
    if champion is None:
        return None
    version = str(champion.version)
    recorded = version_test_predictions(client, champion)
    if recorded is None:
        return ChampionComparison(version, 0, (), f"comparison with champion version {version} "
                                  "skipped: it has no recorded test predictions")
    joined = shared_test_images(pd.read_csv(candidate_predictions), recorded)
    return compare_on_shared(joined, version, min_shared)


def compare_with_champion(client: Any, candidate: Any, champion: Any, alpha: float,
                          min_shared: int = MIN_SHARED_TEST_IMAGES) -> dict[str, Any]:
    """Paired comparison of two registered versions on the test images both were scored on
    (matched by sha256), each at its own threshold. Raises PromotionRejected if they share
    too few."""
    cand, champ = (version_test_predictions(client, mv) for mv in (candidate, champion))
    for mv, preds in ((candidate, cand), (champion, champ)):
        if preds is None:
            raise PromotionRejected(f"version {mv.version} has no recorded test predictions")
    joined = shared_test_images(cand, champ)
    comparison = compare_on_shared(joined, str(champion.version), min_shared)
    if comparison.skipped:
        raise PromotionRejected(
            f"version {candidate.version} and champion {champion.version} share only "
            f"{comparison.shared_images} test images (need {min_shared}); evaluate both on the "
            "same test data, or promote with --force and a reason")
    # Value gates were judged at registration; here only regression decides.
    decision = decide({}, GateThresholds(0.0, 0.0, False, alpha), comparison)
    regression = [c for c in decision.checks if c.name.startswith("no_")]
    y = joined["label"].to_numpy(int)
    cand_pred, champ_pred = joined["prediction_cand"].to_numpy(), joined["prediction_champ"].to_numpy()
    return {
        "shared_images": comparison.shared_images,
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
    comparison = _judge_against(client, name, candidate, champion, alpha, force)
    displaced = alias_version(client, name, PREVIOUS)  # loses its alias below
    now = datetime.now(UTC).isoformat(timespec="seconds")
    audit = {
        "cxr.promoted_by": actor or getpass.getuser(),
        "cxr.promoted_at": now,
        "cxr.promotion_reason": reason or "passed champion comparison",
        "cxr.promotion_forced": str(force).lower(),
        "cxr.promotion_comparison": comparison_tag(comparison),
    }
    if champion is not None:
        _set_alias(client, name, PREVIOUS, champion.version)
    _set_alias(client, name, CHAMPION, candidate.version)  # the atomic switch
    for key, value in audit.items():
        client.set_model_version_tag(name, candidate.version, key, value)
    challenger = alias_version(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(candidate.version):
        client.delete_registered_model_alias(name, CHALLENGER)
    refresh_model_cards(client, name, [candidate.version, champion and champion.version,
                                       displaced and displaced.version])
    if champion is not None and comparison is not None:
        outcome = f"promoted{' by force: ' + reason if force else ''} ({now})"
        log_comparison_report(client, name, candidate, champion, comparison, alpha, outcome)
    elif champion is None:
        note_on_version(client, name, candidate.version,
                        f"Promoted to champion ({now}): first champion, nothing to compare with.")
    describe_registered_model(client, name)
    return PromotionResult(str(candidate.version), str(champion.version) if champion else None,
                           force, comparison)


def comparison_tag(comparison: dict[str, Any] | None) -> str:
    """A short, readable tag for the comparison (the detail is the report artifact)."""
    if not comparison:
        return "none"
    p = {c["name"]: c.get("value") for c in comparison["checks"]}
    shown = ", ".join(f"{k} p={v:.3g}" for k, v in p.items() if v is not None)
    return (f"{'passed' if comparison['passed'] else 'FAILED'} on {comparison['shared_images']} "
            f"shared images ({shown})")[:250]


def promotion_report(client: Any, name: str, version: str) -> str | None:
    """Where the version's latest promotion report lies (``runs:/...``), or None."""
    return (client.get_model_version(name, version).tags or {}).get(PROMOTION_REPORT_TAG)


def note_on_version(client: Any, name: str, version: str, note: str) -> None:
    """Set the promotion note at the end of the version's description (replacing an
    earlier one), under the model card summary."""
    marker = "\n\n---\n**Promotion.** "
    current = (client.get_model_version(name, version).description or "").split(marker, 1)[0]
    client.update_model_version(name, version, description=f"{current}{marker}{note}")


def log_comparison_report(client: Any, name: str, candidate: Any, champion: Any,
                          comparison: dict[str, Any], alpha: float, outcome: str) -> str | None:
    """Log the side-by-side report (markdown and JSON) to the candidate's run, tag the
    version with its location and note it in the version's description. Returns the
    artifact path (None when a version lacks recorded test predictions)."""
    from cxr_core.lifecycle import comparison_report as cr

    preds = {role: version_test_predictions(client, mv)
             for role, mv in (("candidate", candidate), ("champion", champion))}
    if any(p is None for p in preds.values()):
        return None
    thresholds = {role: float((mv.tags or {}).get(THRESHOLD_TAG, 0.5))
                  for role, mv in (("candidate", candidate), ("champion", champion))}
    sets = {"Shared test images": cr.compare_set(cr.paired_rows(preds["candidate"], preds["champion"]),
                                                 thresholds)}
    external = {role: cr.external_predictions(client, mv.run_id)
                for role, mv in (("candidate", candidate), ("champion", champion))}
    for set_name in sorted(external["candidate"].keys() & external["champion"].keys()):
        joined = cr.paired_rows(*(cr.with_threshold(external[r][set_name], thresholds[r])
                                  for r in ("candidate", "champion")))
        if len(joined):
            sets[f"External set {set_name}"] = cr.compare_set(joined, thresholds)
    verdict = {"outcome": outcome, "alpha": alpha, "passed": bool(comparison["passed"]),
               "shared_images": comparison["shared_images"]}
    path = cr.report_path(str(champion.version))
    client.log_text(candidate.run_id, cr.render_report(name, str(candidate.version),
                                                       str(champion.version), verdict, sets), path)
    client.log_text(candidate.run_id, json.dumps(cr.report_json(sets, verdict), indent=2, default=str),
                    path.removesuffix(".md") + ".json")
    client.set_model_version_tag(name, candidate.version, PROMOTION_REPORT_TAG,
                                 f"runs:/{candidate.run_id}/{path}")
    note_on_version(client, name, candidate.version,
                    f"Against champion version {champion.version}: {outcome}; "
                    f"{comparison_tag(comparison)}. Side-by-side report: `{path}` in run "
                    f"{candidate.run_id}.")
    return path


def _judge_against(client: Any, name: str, candidate: Any, champion: Any | None, alpha: float,
                   force: bool) -> dict[str, Any] | None:
    """The comparison with the champion (None without one); raises PromotionRejected on a
    significant regression or too few shared images, unless ``force``. A rejection still
    logs the comparison report, so the UI shows why."""
    if champion is None:
        return None
    try:
        comparison = compare_with_champion(client, candidate, champion, alpha)
    except PromotionRejected:
        if not force:
            raise
        return None
    if not comparison["passed"] and not force:
        path = log_comparison_report(client, name, candidate, champion, comparison, alpha,
                                     "not promoted: significant regression against the champion")
        raise PromotionRejected(
            f"version {candidate.version} regresses significantly against champion "
            f"{champion.version}: {json.dumps(comparison['checks'])}"
            + (f"; side-by-side report: {path} in run {candidate.run_id}" if path else ""))
    return comparison


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
    refresh_model_cards(client, name, [previous.version, current and current.version])
    describe_registered_model(client, name)
    return PromotionResult(str(previous.version), str(current.version) if current else None,
                           False, None)
