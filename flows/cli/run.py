"""``cxr run``: the retraining flow from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxr_core.errors import CxrError, Rejection
from flows.cli.common import ConfigOpt, fail, load_cfg


def run(
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Data set (Kaggle chest-xray layout). Default: the synthetic demo "
        "set, generated under the state home on first use.")] = None,
    profile: Annotated[str | None, typer.Option(
        "--profile", help="Config profile: 'quick' (default without --data-dir) or 'full' "
        "(default with it).")] = None,
    config: ConfigOpt = None,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="Continue an interrupted run (its folder name under <home>/runs): "
        "completed tuner trials are not rerun.")] = None,
    tuner_workers: Annotated[int, typer.Option(
        "--tuner-workers", help="Distributed search: start this many tuner workers as runs of "
        "the tune-worker deployment (needs `cxr deploy` and workers on its pool).")] = 0,
    json_out: Annotated[Path | None, typer.Option(
        "--json-out", help="Also write the run's result (model version, test metrics, stage "
        "times) to this JSON file, for schedulers and benchmarks.")] = None,
) -> None:
    """Run the retraining flow: validate -> balance -> tune -> train -> evaluate -> gate ->
    register. Exit 0 when a model was registered, 1 when validation or the gates rejected,
    2 on bad input."""
    import os

    from cxr_core.settings import get_settings

    settings = get_settings()
    profile = profile or ("full" if data_dir else "quick")
    load_cfg(config, profile)  # fail early on a bad config, before Prefect starts
    if data_dir is not None and not data_dir.is_dir():
        fail(f"{data_dir}: not a directory", 2)
    if settings.prefect_api_url:
        os.environ.setdefault("PREFECT_API_URL", settings.prefect_api_url)
    from flows.retrain import retrain_flow

    try:
        result = retrain_flow(data_dir=str(data_dir.resolve()) if data_dir else None,
                              profile=profile, config=str(config.resolve()) if config else None,
                              tuner_workers=tuner_workers, resume=resume)
    except Rejection as exc:
        fail(str(exc), 1)
    except CxrError as exc:
        fail(str(exc), 2)
    metrics = result["test_metrics"]
    if json_out is not None:
        import json

        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    typer.echo("")
    typer.echo(f"registered {result['model_uri']} (alias 'challenger'); threshold "
               f"{result['threshold']:.4f}")
    typer.echo("test: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in
                                    ("accuracy", "recall", "specificity", "roc_auc")))
    typer.echo(f"{result['trials']} tuner trials; stage times (s): " + ", ".join(
        f"{k} {v:.0f}" for k, v in result["stage_seconds"].items()))
    typer.echo(f"work directory: {result['run_dir']} (resume with --resume "
               f"{Path(result['run_dir']).name})")
    uri = settings.mlflow_tracking_uri
    if uri.startswith("sqlite"):
        typer.echo(f"MLflow UI: mlflow ui --backend-store-uri {uri} --port 5000, then open "
                   "http://127.0.0.1:5000/#/experiments (runs table, compare view)")
    else:
        typer.echo(f"MLflow UI: {uri}/#/experiments")
    typer.echo("next: cxr models list | cxr promote | cxr predict --model "
               f"models:/{settings.registered_model_name}@champion IMAGES...")

