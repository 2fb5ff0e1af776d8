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
) -> None:
    """Score images with a registered model at its stored threshold. Unreadable files are
    reported (and listed in <output>.errors.csv) and skipped; the run goes on."""
    from cxr_core.lifecycle.predict import collect_paths, load_model, predict_paths, write_predictions
    from cxr_core.settings import get_settings
    from flows.clients import short_mlflow_retries

    settings = get_settings()
    uri = model or f"models:/{settings.registered_model_name}@champion"
    files, skipped = collect_paths(paths)
    for path, why in skipped:
        typer.echo(f"skipped {path}: {why}", err=True)
    if not files:
        fail("no image files found in " + ", ".join(str(p) for p in paths), EXIT_BAD_INPUT)
    short_mlflow_retries()
    loaded = load_model(uri, settings.mlflow_tracking_uri)
    preds, errors = predict_paths(loaded, files, batch_size=batch_size)
    write_predictions(preds, errors, output)
    for row in errors.itertuples():
        typer.echo(f"unreadable {row.path}: {row.error}", err=True)
    n_pos = int((preds["label"] == "PNEUMONIA").sum())
    typer.echo(f"{len(preds)} image(s) scored with {uri} (threshold {loaded.threshold:.4f}): "
               f"{n_pos} PNEUMONIA, {len(preds) - n_pos} NORMAL; {len(errors)} unreadable")
    typer.echo(f"wrote {output}")
