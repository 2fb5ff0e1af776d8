"""Drift in the orchestrator: the Prefect event a drifted batch emits, and the automation
that runs the retrain deployment when one arrives (set up by ``cxr deploy``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DRIFT_EVENT = "cxr.drift.detected"
AUTOMATION_NAME = "retrain-on-drift"


def emit_drift_event(report: Any, model_uri: str, output: Path, model_name: str) -> Any:
    """Emit ``cxr.drift.detected`` for the model (resource ``cxr.model.<name>``) with the
    reasons; returns the event, or None when no Prefect API receives events here."""
    from prefect.events import emit_event

    return emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": f"cxr.model.{model_name}",
                  "prefect.resource.name": model_name, "cxr.model_uri": model_uri},
        payload={"reasons": list(report.reasons)[:20], "n_images": report.n_images,
                 "predictions": str(output)},
    )


def flush_events(timeout: float = 10.0) -> None:
    """Send queued events now: a short-lived CLI process would otherwise exit first."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=timeout)


def ensure_drift_automation(retrain_deployment_id: Any, enabled: bool,
                            model_name: str | None = None) -> Any:
    """Create or update the ``retrain-on-drift`` automation: on ``cxr.drift.detected`` (for
    ``model_name``, or any cxr model) run the retrain deployment with its own parameters.
    ``enabled=False`` keeps it off until the user turns it on (UI, or ``cxr deploy
    --retrain-on-drift``). Returns its id."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import EventTrigger, Posture

    resource = f"cxr.model.{model_name}" if model_name else "cxr.model.*"
    spec = dict(
        name=AUTOMATION_NAME,
        description="Runs the retrain deployment when a prediction batch drifts from the "
                    "model's reference (cxr predict / batch-predict emit cxr.drift.detected).",
        enabled=enabled,
        trigger=EventTrigger(expect={DRIFT_EVENT}, match={"prefect.resource.id": resource},
                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[RunDeployment(source="selected", deployment_id=retrain_deployment_id)],
    )
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:
        existing = None
    if existing is None:
        return Automation(**spec).create().id
    for key, value in spec.items():
        setattr(existing, key, value)
    existing.update()
    return existing.id


def check_predictions(loaded: Any, paths: list[str], output: Path, model_uri: str,
                      settings: Any, alpha: float = 0.01, emit: bool = True) -> Any:
    """The drift check of a scored batch, for ``cxr predict`` and the batch-predict flow:
    reports beside ``output``, an MLflow run in ``<experiment>-monitoring`` (best effort: a
    tracking outage is reported in the outcome, the predictions stand) and, when drifted
    and ``emit``, the Prefect event. Returns the DriftOutcome (``event_sent`` and
    ``log_error`` added)."""
    from cxr_core.lifecycle.monitoring import check_batch, log_check
    from cxr_core.lifecycle.tracking import make_client

    outcome = check_batch(loaded, paths, output, model_uri, alpha=alpha)
    outcome.log_error = None
    try:
        log_check(make_client(settings.mlflow_tracking_uri), settings.experiment_name, outcome,
                  output, settings.artifact_location)
    except Exception as exc:  # noqa: BLE001 - monitoring must not lose the predictions
        outcome.log_error = f"{type(exc).__name__}: {exc}"
    outcome.event_sent = False
    if outcome.report.drifted and emit:
        event = emit_drift_event(outcome.report, model_uri, output,
                                 settings.registered_model_name)
        outcome.event_sent = event is not None
    return outcome
