"""``cxr predict``: score image files and folders with a registered model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import EXIT_BAD_INPUT, fail


def predict_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Image files and folders (recursive).")],
    model: Annotated[str, typer.Option(
        "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/model or a local "
        "model folder. Default: models:/<registered model>@champion.")] = "",
    output: Annotated[Path, typer.Option("--output", help="CSV: path, probability, label.")] = Path(
        "predictions.csv"),
    batch_size: Annotated[int, typer.Option(help="Images per inference batch.")] = 64,
    drift: Annotated[bool, typer.Option(
        "--drift/--no-drift", help="Compare the batch with the model's drift reference: "
        "<output>.drift.json and .drift.md, an MLflow run in <experiment>-monitoring, and a "
        "Prefect event (cxr.drift.detected) when it drifted and a Prefect server is set.")] = True,
    drift_alpha: Annotated[float, typer.Option(
        help="Family-wise significance level of the drift tests (Bonferroni).")] = 0.01,
    threshold: Annotated[str, typer.Option(
        "--threshold", help="'model': the model's own threshold; 'site': the site threshold "
        "chosen on a calibration sample (`cxr run --calibration DIR`).")] = "model",
) -> None:
    """Score images with a registered model at its stored threshold. Unreadable files are
    reported (and listed in <output>.errors.csv) and skipped; the run goes on."""
    from cxr_core.lifecycle.predict import collect_paths, load_model, predict_paths, write_predictions
    from cxr_core.settings import get_settings
    from flows.clients import short_mlflow_retries

    if threshold not in ("model", "site"):
        fail(f"--threshold {threshold!r}: expected 'model' or 'site'", EXIT_BAD_INPUT)
    settings = get_settings()
    uri = model or f"models:/{settings.registered_model_name}@champion"
    files, skipped = collect_paths(paths)
    for path, why in skipped:
        typer.echo(f"skipped {path}: {why}", err=True)
    if not files:
        fail("no image files found in " + ", ".join(str(p) for p in paths), EXIT_BAD_INPUT)
    short_mlflow_retries()
    loaded = load_model(uri, settings.mlflow_tracking_uri)
    if threshold == "site":
        loaded = loaded.at_site_threshold()  # InputError when the model has none
    preds, errors = predict_paths(loaded, files, batch_size=batch_size)
    write_predictions(preds, errors, output)
    for row in errors.itertuples():
        typer.echo(f"unreadable {row.path}: {row.error}", err=True)
    n_pos = int((preds["label"] == "PNEUMONIA").sum())
    typer.echo(f"{len(preds)} image(s) scored with {uri} (threshold {loaded.threshold:.4f}): "
               f"{n_pos} PNEUMONIA, {len(preds) - n_pos} NORMAL; {len(errors)} unreadable")
    typer.echo(f"wrote {output}")
    if drift and len(preds):
        _drift_check(loaded, list(preds["path"]), output, uri, settings, drift_alpha)


def _drift_check(loaded, paths, output, uri, settings, alpha) -> None:
    """Run the drift check and say what it found (never changes the exit code)."""
    import os

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.drift import check_predictions, flush_events

    # Events go out only to a configured server: no throw-away one just for an event.
    api = os.environ.get("PREFECT_API_URL") or settings.prefect_api_url
    with temporary_settings({PREFECT_API_URL: api} if api else {}):
        outcome = check_predictions(loaded, paths, output, uri, settings, alpha, emit=bool(api))
        if outcome.event_sent:
            flush_events()
    r = outcome.report
    verdict = ("skipped: " + r.skipped) if r.skipped else ("DRIFTED" if r.drifted else "no drift")
    typer.echo(f"drift check: {verdict}; {outcome.json_path}, {outcome.summary_path}")
    for reason in r.reasons:
        typer.echo(f"  drift: {reason}", err=True)
    if outcome.log_error:
        typer.echo(f"  drift check not logged to MLflow: {outcome.log_error}", err=True)
    if r.drifted:
        typer.echo("  Prefect event cxr.drift.detected " + ("sent" if outcome.event_sent else
                   "not sent (no Prefect server: cxr stack up or CXR_PREFECT_API_URL)"))
