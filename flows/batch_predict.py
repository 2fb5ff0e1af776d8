"""The batch prediction flow: score a folder with the champion, keep the CSV as an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_table_artifact

from cxr_core.lifecycle.predict import collect_paths, load_model, predict_paths, write_predictions
from cxr_core.settings import get_settings
from flows.tasks import IO_RETRIES


@task(name="load-model", **IO_RETRIES)
def load_model_task(model_uri: str, tracking_uri: str) -> Any:
    return load_model(model_uri, tracking_uri)


@flow(name="batch-predict", log_prints=True)
def batch_predict_flow(input_dir: str, output_csv: str | None = None,
                       model_uri: str | None = None) -> dict[str, Any]:
    """Score every image under ``input_dir``; unreadable files are listed, not fatal."""
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
    return {"output": str(out), "scored": len(preds), "unreadable": len(errors),
            "errors": errors.to_dict("records")}
