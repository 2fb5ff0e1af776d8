"""The batch prediction flow: score a folder with the champion, keep the CSV as an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from cxr_core.lifecycle.predict import collect_paths, load_model, predict_paths, write_predictions
from cxr_core.settings import get_settings
from flows.tasks import IO_RETRIES


@task(name="load-model", **IO_RETRIES)
def load_model_task(model_uri: str, tracking_uri: str) -> Any:
    return load_model(model_uri, tracking_uri)


@flow(name="batch-predict", log_prints=True)
def batch_predict_flow(input_dir: str, output_csv: str | None = None,
                       model_uri: str | None = None, drift: bool = True,
                       drift_alpha: float = 0.01) -> dict[str, Any]:
    """Score every image under ``input_dir``; unreadable files are listed, not fatal. With
    ``drift``, the batch is compared with the model's reference (flows/drift.py): a drifted
    batch emits ``cxr.drift.detected``, which the retrain-on-drift automation can act on."""
    settings = get_settings()
    uri = model_uri or f"models:/{settings.registered_model_name}@champion"
    files, skipped = collect_paths([Path(input_dir)])
    loaded = load_model_task(uri, settings.mlflow_tracking_uri)
    preds, errors = predict_paths(loaded, files)
    out = Path(output_csv) if output_csv else settings.home / "predictions" / (
        Path(input_dir).name + ".csv")
    write_predictions(preds, errors, out)
    create_link_artifact(key="predictions-csv", link=out.resolve().as_uri(),
                         description=f"{len(preds)} predictions by {uri}")
    create_table_artifact(key="prediction-summary", table=[
        {"label": label, "images": int((preds["label"] == label).sum())}
        for label in ("NORMAL", "PNEUMONIA")] + [{"label": "unreadable", "images": len(errors)}])
    print(f"{len(preds)} scored, {len(errors)} unreadable, {len(skipped)} skipped -> {out}")
    result = {"output": str(out), "scored": len(preds), "unreadable": len(errors),
              "errors": errors.to_dict("records")}
    if drift and len(preds):
        result["drift"] = drift_task(loaded, list(preds["path"]), out, uri, drift_alpha)
    return result


@task(name="drift-check", cache_policy=NO_CACHE)
def drift_task(loaded: Any, paths: list[str], output: Path, uri: str,
               alpha: float) -> dict[str, Any]:
    """Drift of this batch against the model's reference; the summary as a flow artifact."""
    from prefect.artifacts import create_markdown_artifact

    from flows.drift import check_predictions

    outcome = check_predictions(loaded, paths, output, uri, get_settings(), alpha)
    create_markdown_artifact(key="drift-check", markdown=outcome.report.summary(),
                             description=f"drift of {Path(output).name} vs the model reference")
    print(f"drift: {'DRIFTED' if outcome.report.drifted else 'no drift'}"
          + "".join(f"\n  {r}" for r in outcome.report.reasons))
    return {"drifted": outcome.report.drifted, "reasons": outcome.report.reasons,
            "report": str(outcome.json_path), "event_sent": outcome.event_sent,
            "mlflow_run_id": outcome.run_id, "log_error": outcome.log_error}
