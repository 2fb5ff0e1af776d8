"""``cxr run``: the retraining flow from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cxr_core.errors import DataValidationError, GateRejected, Rejection, is_transient
from flows.cli.common import ConfigOpt, error_message, exit_code, load_cfg


def run(
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Data set (Kaggle chest-xray layout). Default: the synthetic demo "
        "set, generated under the state home on first use.")] = None,
    profile: Annotated[str | None, typer.Option(
        "--profile", help="Config profile: 'quick' (default without --data-dir) or 'full' "
        "(default with it).")] = None,
    config: ConfigOpt = None,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="Continue an interrupted run (its folder name under <home>/runs) with "
        "the data folder, profile and config it started with: completed tuner trials are not "
        "rerun; a resume whose data changed is refused.")] = None,
    external: Annotated[list[str] | None, typer.Option(
        "--external", metavar="NAME=DIR", help="An external validation set (repeatable): a "
        "labelled folder from another site or device (test/{NORMAL,PNEUMONIA}, or NORMAL/ and "
        "PNEUMONIA/ directly), scored after training at the model's threshold and logged as "
        "external_NAME_* metrics; never used to fit, tune or choose the threshold. Merged with "
        "the config's data.external (this one wins on a name); gates.external.NAME adds gates.")] = None,
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", help="A labelled sample from the deployment site: after training, a "
        "site threshold is chosen on it with the recall target of the main one and stored as "
        "the version tag cxr.site_threshold (the model's own threshold is unchanged; use it "
        "with `cxr predict --threshold site`). It must share no image with an external set or "
        "the test split.")] = None,
    unlabeled: Annotated[Path | None, typer.Option(
        "--unlabeled", help="Unlabeled images from the deployment site (any folder layout; "
        "folder names are not read as labels): after early stopping the model labels the "
        "most confident ends of its ranking of them and trains on for train.pseudo_label."
        "epochs epochs with those pseudo-labels beside the labelled images. Must share no "
        "image with the validation or test split, an external set or the calibration "
        "sample.")] = None,
    tuner_workers: Annotated[int, typer.Option(
        "--tuner-workers", help="Distributed search: start this many tuner workers as runs of "
        "the tune-worker deployment (needs `cxr deploy` and workers on its pool).")] = 0,
    json_out: Annotated[Path | None, typer.Option(
        "--json-out", help="Also write the outcome to this JSON file, for schedulers and "
        "benchmarks: 'outcome' (registered, gate_rejected, validation_failed, error), "
        "'exit_code', 'reason', and the run's result (model version, test metrics, stage "
        "times) when there is one.")] = None,
) -> None:
    """Run the retraining flow: validate -> balance -> tune -> train -> evaluate -> gate ->
    register. Exit 0 when a model was registered, 1 when validation or the gates rejected,
    2 on bad input."""
    from cxr_core.settings import get_settings

    settings = get_settings()
    try:
        result = _retrain(settings, data_dir, profile, config, resume, tuner_workers,
                          external or [], calibration, unlabeled)
    except Exception as exc:
        if json_out is not None and exit_code(exc) is not None:
            _write_json(json_out, failure_record(exc))
        run_dir = getattr(exc, "details", {}).get("run_dir")
        if run_dir and is_transient(exc):  # an outage: the same run can go on later
            typer.echo(f"continue this run with: cxr run --resume {Path(run_dir).name}", err=True)
        raise
    if json_out is not None:
        _write_json(json_out, {"outcome": "registered", "exit_code": 0, "reason": None, **result})
    _print_result(result, settings)


def _retrain(settings: Any, data_dir: Path | None, profile: str | None, config: Path | None,
             resume: str | None, tuner_workers: int, external_opts: list[str],
             calibration: Path | None, unlabeled: Path | None = None) -> dict[str, Any]:
    """Check the inputs (in a second, before Prefect starts), then run the flow."""
    import os

    from cxr_core.data.external import (
        check_calibration_folder,
        parse_external_options,
        resolve_external_sets,
    )
    from cxr_core.data.manifest import find_data_root
    from cxr_core.data.unlabeled import check_unlabeled_folder
    from flows.run_spec import check_resume_args, default_profile, load_run

    external = parse_external_options(external_opts)  # InputError: malformed, a name twice
    if resume:
        check_resume_args(load_run(settings.runs_dir, resume), data_dir, profile, config,
                          external, calibration, unlabeled)
    else:
        cfg = load_cfg(config, profile or default_profile(data_dir))
        if data_dir is not None:
            find_data_root(data_dir)  # DataLayoutError: not a folder, no train/val/test inside
        resolve_external_sets(cfg, external)  # missing folders, gates naming unknown sets
        if calibration is not None:
            check_calibration_folder(calibration)
        if unlabeled is not None:
            check_unlabeled_folder(unlabeled)
    if settings.prefect_api_url:
        os.environ.setdefault("PREFECT_API_URL", settings.prefect_api_url)
    from flows.retrain import retrain_flow

    return retrain_flow(data_dir=str(data_dir.resolve()) if data_dir else None, profile=profile,
                        config=str(config.resolve()) if config else None,
                        tuner_workers=tuner_workers, resume=resume, external=external or None,
                        calibration=str(calibration.resolve()) if calibration else None,
                        unlabeled=str(unlabeled.resolve()) if unlabeled else None)


def failure_record(exc: BaseException) -> dict[str, Any]:
    """The --json-out record of a run that registered nothing: what happened and why, with
    whatever the run produced (its work directory; metrics and gates when they rejected)."""
    outcome = ("gate_rejected" if isinstance(exc, GateRejected) else
               "validation_failed" if isinstance(exc, DataValidationError) else
               "rejected" if isinstance(exc, Rejection) else "error")
    details = getattr(exc, "details", {})
    return {**details, "outcome": outcome, "exit_code": exit_code(exc),
            "reason": error_message(exc), "model_version": details.get("model_version")}


def _write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")


def _print_result(result: dict[str, Any], settings: Any) -> None:
    metrics = result["test_metrics"]
    typer.echo("")
    typer.echo(f"registered {result['model_uri']} (alias 'challenger'); threshold "
               f"{result['threshold']:.4f}")
    typer.echo("test: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in
                                    ("accuracy", "recall", "specificity", "roc_auc")))
    for name, ext in (result.get("external_metrics") or {}).items():
        typer.echo(f"external {name}: " + ", ".join(
            f"{k} {ext[k]:.3f}" for k in ("accuracy", "recall", "specificity", "roc_auc") if k in ext))
    if result.get("pseudo_labels"):
        pl = result["pseudo_labels"]
        typer.echo(f"pseudo-labels: {pl['pseudo_normal']} NORMAL and {pl['pseudo_pneumonia']} "
                   f"PNEUMONIA of {pl['unlabeled_images']} unlabeled site images")
    if result.get("site_threshold"):
        site = result["site_threshold"]
        typer.echo(f"site threshold {site['threshold']:.4f} (recall {site['recall']:.3f}, "
                   f"specificity {site['specificity']:.3f} on {site['images']} images)")
    typer.echo(f"{result['trials']} tuner trials; stage times (s): " + ", ".join(
        f"{k} {v:.0f}" for k, v in result["stage_seconds"].items()))
    typer.echo(f"work directory: {result['run_dir']}")
    uri = settings.mlflow_tracking_uri
    if uri.startswith("sqlite"):
        typer.echo(f"MLflow UI: mlflow ui --backend-store-uri {uri} --port 5000, then open "
                   "http://127.0.0.1:5000/#/experiments (runs table, compare view)")
    else:
        typer.echo(f"MLflow UI: {uri}/#/experiments")
    typer.echo("next: cxr models list | cxr promote | cxr predict --model "
               f"models:/{settings.registered_model_name}@champion IMAGES...")
