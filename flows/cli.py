"""The ``cxr`` command line: the user's front door.

Commands stay thin: they resolve settings and config, call ``cxr_core`` (or launch a flow)
and turn outcomes into exit codes: 0 success, 1 rejected (data or gate), 2 bad usage/input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxr_core.errors import CxrError, Rejection

app = typer.Typer(
    help="cxr: train, gate, register and promote pneumonia-vs-normal chest X-ray classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Data commands: synthesize a demo set, scan a folder into a manifest, validate it.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
stack_app = typer.Typer(help="The local stack on 127.0.0.1: MLflow server, Prefect server and "
                        "optionally an S3 endpoint, as background processes.",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")


@app.callback()
def _use_stack_when_up() -> None:
    """cxr: train, gate, register and promote pneumonia-vs-normal chest X-ray classifiers."""
    from cxr_core.settings import get_settings
    from flows.stack import apply_stack_env

    apply_stack_env(get_settings())
tune_app = typer.Typer(
    help="Distributed hyperparameter search: one chief serves Keras Tuner's oracle, workers "
    "(e.g. one per GPU) run trials, all over one shared work directory.",
    no_args_is_help=True,
)
app.add_typer(tune_app, name="tune")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="Experiment YAML merged over the shipped defaults.",
                 exists=True, dir_okay=False),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", help="Named profile: 'quick' (synthetic demo) or 'full' (real data)."),
]


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _load(config: Path | None, profile: str | None):
    from cxr_core.config import load_config

    try:
        return load_config(config, profile)
    except CxrError as exc:
        _fail(str(exc), 2)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to create (must be empty or absent).")],
    n_per_class: Annotated[int, typer.Option(help="Images per class over all splits.")] = 120,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
) -> None:
    """Write a synthetic chest X-ray data set in the Kaggle layout (train/val/test x
    NORMAL/PNEUMONIA, JPEG, several images per patient)."""
    from cxr_core.synth import synthesize_dataset

    try:
        summary = synthesize_dataset(out, n_per_class=n_per_class, size=size, seed=seed)
    except (FileExistsError, ValueError) as exc:
        _fail(str(exc), 2)
    typer.echo(f"wrote {summary.root} ({summary.n_patients} patients)")
    for split, counts in summary.counts.items():
        typer.echo(f"  {split:5s}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@data_app.command("scan")
def data_scan(
    data_dir: Annotated[Path, typer.Argument(help="Data set root (Kaggle chest-xray layout).")],
    out: Annotated[Path, typer.Option("--out", help="Manifest file (.parquet or .csv).")] = Path(
        "manifest.parquet"),
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Scan a data set into an image manifest (one row per file, every image decoded) and
    assign the final splits (val/test carved from train by patient where missing). Writes the
    quarantine list of unreadable files beside the manifest. Never changes the source files."""
    from cxr_core.dataset import scan_and_split
    from cxr_core.manifest import write_manifest

    cfg = _load(config, profile)
    try:
        scan = scan_and_split(data_dir, cfg.data, cfg.seed)
    except CxrError as exc:
        _fail(str(exc), 2)
    path = write_manifest(scan.manifest, out)
    quarantine = path.with_name(path.stem + ".quarantine.csv")
    scan.quarantine.to_csv(quarantine, index=False)
    m = scan.manifest
    typer.echo(f"scanned {scan.root}: {len(m)} images, {int((~m['readable']).sum())} unreadable, "
               f"{len(scan.skipped)} junk skipped")
    for (split, label), n in m.groupby(["split", "label"], dropna=False).size().items():
        typer.echo(f"  {split:5s} {label}: {n}")
    for row in scan.quarantine.itertuples():
        typer.echo(f"  unreadable: {row.path}: {row.error}")
    typer.echo(f"manifest: {path}\nquarantine: {quarantine}")


@data_app.command("validate")
def data_validate(
    data_dir: Annotated[Path, typer.Argument(help="Data set root (Kaggle chest-xray layout).")],
    report_dir: Annotated[Path | None, typer.Option(
        "--report-dir", help="Where to write Data Docs (HTML), the JSON summary, the manifest "
        "and the quarantine list. Default: <home>/reports/validation.")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Validate a data set with great_expectations: readable files, sizes, duplicates,
    leakage between splits, patients across splits, class balance and a size-shortcut
    audit. Exit 0 when it passes, 1 when an error-severity check fails (every offending
    file is named)."""
    from cxr_core.dataset import validate_dataset
    from cxr_core.settings import get_settings

    cfg = _load(config, profile)
    report_dir = report_dir or get_settings().home / "reports" / "validation"
    try:
        _, report = validate_dataset(data_dir, cfg.data, cfg.validation, cfg.seed, report_dir)
    except Rejection as exc:
        _fail(str(exc), 2)
    typer.echo(report.summary_text())
    typer.echo(f"  JSON summary: {report_dir / 'validation_summary.json'}")
    raise typer.Exit(0 if report.passed else 1)


@app.command("run")
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
    _load(config, profile)  # fail early on a bad config, before Prefect starts
    if data_dir is not None and not data_dir.is_dir():
        _fail(f"{data_dir}: not a directory", 2)
    if settings.prefect_api_url:
        os.environ.setdefault("PREFECT_API_URL", settings.prefect_api_url)
    from flows.retrain import retrain_flow

    try:
        result = retrain_flow(data_dir=str(data_dir.resolve()) if data_dir else None,
                              profile=profile, config=str(config.resolve()) if config else None,
                              tuner_workers=tuner_workers, resume=resume)
    except Rejection as exc:
        _fail(str(exc), 1)
    except CxrError as exc:
        _fail(str(exc), 2)
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


models_app = typer.Typer(help="The model registry: versions, aliases and key metrics.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


def _client():
    from cxr_core.settings import get_settings
    from cxr_core.tracking import make_client

    settings = get_settings()
    return settings, make_client(settings.mlflow_tracking_uri)


@models_app.command("list")
def models_list() -> None:
    """List registered versions (newest first) with aliases, gate verdict, threshold and test
    metrics."""
    from cxr_core.registry import list_versions

    settings, client = _client()
    versions = list_versions(client, settings.registered_model_name)
    if not versions:
        typer.echo(f"no versions of {settings.registered_model_name!r} at "
                   f"{settings.mlflow_tracking_uri}")
        return
    typer.echo(f"{'version':>7}  {'aliases':28} {'gates':6} {'threshold':>9}  metrics")
    for v in versions:
        metrics = ", ".join(f"{k} {val:.3f}" for k, val in sorted(v.metrics.items()))
        threshold = f"{v.threshold:.4f}" if v.threshold is not None else "-"
        typer.echo(f"{v.version:>7}  {','.join(v.aliases) or '-':28} "
                   f"{'pass' if v.gate_passed else 'FAIL':6} {threshold:>9}  {metrics}")


@app.command("promote")
def promote_cmd(
    version: Annotated[str | None, typer.Argument(
        help="Version to promote (default: the 'challenger' alias).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Promote despite a failed or impossible champion comparison "
        "(never despite failed gates). Needs --reason.")] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="Recorded on the version.")] = None,
) -> None:
    """Compare the challenger (or VERSION) with the champion on the same test images
    (McNemar), then move 'champion' to it and keep the old one as 'previous-champion', with
    audit tags (who, when, why, comparison)."""
    from cxr_core.registry import promote

    settings, client = _client()
    try:
        result = promote(client, settings.registered_model_name, version, force=force,
                         reason=reason)
    except Rejection as exc:
        _fail(str(exc), 1)
    typer.echo(f"champion -> version {result.promoted_version}"
               + (f" (previous-champion: {result.previous_champion})"
                  if result.previous_champion else "") + (" [forced]" if result.forced else ""))
    if result.comparison:
        c = result.comparison
        typer.echo(f"  on {c['shared_images']} shared test images: accuracy "
                   f"{c['candidate_accuracy']:.3f} vs {c['champion_accuracy']:.3f}")


@app.command("rollback")
def rollback_cmd(
    reason: Annotated[str | None, typer.Option("--reason", help="Recorded on the version.")] = None,
) -> None:
    """Restore 'previous-champion' as 'champion' (the replaced version becomes
    'previous-champion', so a rollback can be undone)."""
    from cxr_core.registry import rollback

    settings, client = _client()
    try:
        result = rollback(client, settings.registered_model_name, reason=reason)
    except Rejection as exc:
        _fail(str(exc), 1)
    typer.echo(f"champion -> version {result.promoted_version} (was {result.previous_champion})")


@app.command("predict")
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
    from cxr_core.predict import collect_paths, load_model, predict_paths, write_predictions

    settings, _ = _client()
    uri = model or f"models:/{settings.registered_model_name}@champion"
    files, skipped = collect_paths(paths)
    for path, why in skipped:
        typer.echo(f"skipped {path}: {why}", err=True)
    if not files:
        _fail("no image files found in " + ", ".join(str(p) for p in paths), 2)
    try:
        loaded = load_model(uri, settings.mlflow_tracking_uri)
    except CxrError as exc:
        _fail(str(exc), 2)
    preds, errors = predict_paths(loaded, files, batch_size=batch_size)
    write_predictions(preds, errors, output)
    for row in errors.itertuples():
        typer.echo(f"unreadable {row.path}: {row.error}", err=True)
    n_pos = int((preds["label"] == "PNEUMONIA").sum())
    typer.echo(f"{len(preds)} image(s) scored with {uri} (threshold {loaded.threshold:.4f}): "
               f"{n_pos} PNEUMONIA, {len(preds) - n_pos} NORMAL; {len(errors)} unreadable")
    typer.echo(f"wrote {output}")


@stack_app.command("up")
def stack_up(
    s3: Annotated[bool, typer.Option("--s3", help="Also start an S3 endpoint (moto) for "
                                     "development; MLflow artifacts then go to S3.")] = False,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = 5000,
    prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
) -> None:
    """Start the servers (health-checked) with pid files and logs under <home>/stack; later
    cxr commands use them automatically."""
    from cxr_core.settings import get_settings
    from flows import stack

    try:
        state = stack.up(get_settings(), with_s3=s3, mlflow_port=mlflow_port,
                         prefect_port=prefect_port)
    except (RuntimeError, TimeoutError) as exc:
        _fail(str(exc), 2)
    for name, svc in state["services"].items():
        typer.echo(f"{name:8s} {svc['url']}  (pid {svc['pid']}, log {svc['log']})")
    typer.echo(f"MLflow UI: {state['services']['mlflow']['url']}/#/experiments")


@stack_app.command("down")
def stack_down() -> None:
    """Stop every stack process and its children."""
    from cxr_core.settings import get_settings
    from flows import stack

    stopped = stack.down(get_settings())
    typer.echo("stopped: " + (", ".join(stopped) or "nothing was running"))


@stack_app.command("status")
def stack_status() -> None:
    """Show each stack service, its process and its health check. Exit 1 if any is down."""
    from cxr_core.settings import get_settings
    from flows import stack

    rows = stack.status(get_settings())
    if not rows:
        typer.echo("the stack is not running (cxr stack up)")
        raise typer.Exit(1)
    for svc, alive, healthy in rows:
        typer.echo(f"{svc.name:8s} {svc.url:32s} pid {svc.pid:<7d} "
                   f"{'running' if alive else 'DEAD':8s} {'healthy' if healthy else 'UNHEALTHY'}")
    raise typer.Exit(0 if all(h for _, _, h in rows) else 1)


@app.command("deploy")
def deploy_cmd(
    cron: Annotated[str, typer.Option(help="Retrain schedule (cron, UTC).")] = "0 3 * * 1",
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Data set the scheduled retrain uses (default: demo data).")] = None,
    profile: Annotated[str, typer.Option(help="Profile of the scheduled retrain.")] = "full",
    cpu_pool: Annotated[str, typer.Option(help="Process work pool for CPU flows.")] = "cpu",
    gpu_pool: Annotated[str, typer.Option(help="Work pool of tuner workers.")] = "gpu",
    gpu_pool_type: Annotated[str, typer.Option(
        help="Type used if the gpu pool must be created: 'process' here, 'kubernetes' in "
        "production with infra/k8s/gpu-work-pool.json.")] = "process",
) -> None:
    """Create the work pools (if missing) and the deployments: scheduled retrain (weekly by
    default), promote, batch-predict and tune-worker. Needs a Prefect server (cxr stack up, or
    CXR_PREFECT_API_URL)."""
    import os

    from cxr_core.settings import get_settings
    from flows.deploy import deploy_all, deployment_specs, ensure_work_pool

    settings = get_settings()
    api = os.environ.get("PREFECT_API_URL") or settings.prefect_api_url
    if not api:
        _fail("no Prefect server: run `cxr stack up` or set CXR_PREFECT_API_URL", 2)
    os.environ["PREFECT_API_URL"] = api
    ensure_work_pool(cpu_pool, "process")
    ensure_work_pool(gpu_pool, gpu_pool_type)
    specs = deployment_specs(cron, str(data_dir.resolve()) if data_dir else None, profile,
                             cpu_pool, gpu_pool)
    deploy_all(specs)
    for spec in specs:
        flow_name = spec.entrypoint.split(":")[1].removesuffix("_flow").replace("_", "-")
        typer.echo(f"deployed {flow_name}/{spec.name} on pool {spec.pool}"
                   + (f", cron '{spec.cron}'" if spec.cron else ""))
    typer.echo(f"start workers: prefect worker start --pool {cpu_pool}  (and --pool {gpu_pool} "
               "on GPU machines)")


WorkDirOpt = Annotated[Path, typer.Option(
    "--work-dir", help="Shared directory (same path for chief and every worker): prepared "
    "manifest, augmented images and tuner state.")]
OracleIpOpt = Annotated[str | None, typer.Option(
    "--oracle-ip", envvar="KERASTUNER_ORACLE_IP", help="Chief's address.")]
OraclePortOpt = Annotated[int | None, typer.Option(
    "--oracle-port", envvar="KERASTUNER_ORACLE_PORT", help="Chief's port.")]


def _set_role(role: str, ip: str | None, port: int | None) -> None:
    import os

    if not ip or not port:
        _fail("--oracle-ip and --oracle-port (or KERASTUNER_ORACLE_IP/PORT) are required", 2)
    os.environ["KERASTUNER_TUNER_ID"] = role
    os.environ["KERASTUNER_ORACLE_IP"] = ip
    os.environ["KERASTUNER_ORACLE_PORT"] = str(port)


@tune_app.command("chief")
def tune_chief(
    work_dir: WorkDirOpt,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Data set to prepare (scan, split, validate, balance) unless the "
        "work dir already holds a prepared manifest.")] = None,
    oracle_ip: OracleIpOpt = None,
    oracle_port: OraclePortOpt = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Prepare the data once, then serve the search's oracle until every worker is done
    (Keras Tuner distributed mode). Prints the best trial."""
    from cxr_core.training import PREPARED_MANIFEST, prepare_training_manifest

    cfg = _load(config, profile)
    _set_role("chief", oracle_ip, oracle_port)
    try:
        if not (work_dir / PREPARED_MANIFEST).is_file():
            if data_dir is None:
                _fail(f"{work_dir / PREPARED_MANIFEST} does not exist: give --data-dir", 2)
            prepare_training_manifest(data_dir, cfg, work_dir)
        from cxr_core.training import tune_from_manifest

        tuner, trials = tune_from_manifest(work_dir, cfg, chief=True)
    except Rejection as exc:
        _fail(str(exc), 1)
    except CxrError as exc:
        _fail(str(exc), 2)
    _print_trials(trials)


@tune_app.command("worker")
def tune_worker(
    work_dir: WorkDirOpt,
    tuner_id: Annotated[str, typer.Option(
        "--tuner-id", envvar="KERASTUNER_TUNER_ID", help="This worker's id (tuner0, tuner1, ...).")
    ] = "tuner0",
    oracle_ip: OracleIpOpt = None,
    oracle_port: OraclePortOpt = None,
    wait_s: Annotated[float, typer.Option(help="How long to wait for the chief's data.")] = 600.0,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Run trials handed out by the chief until the search's budget is spent. Use the same
    --config/--profile as the chief."""
    from cxr_core.training import tune_from_manifest, wait_for_manifest

    cfg = _load(config, profile)
    if tuner_id == "chief":
        _fail("a worker's --tuner-id must not be 'chief'", 2)
    _set_role(tuner_id, oracle_ip, oracle_port)
    try:
        wait_for_manifest(work_dir, timeout_s=wait_s)
        _, trials = tune_from_manifest(work_dir, cfg, chief=False)
    except Rejection as exc:
        _fail(str(exc), 1)
    except CxrError as exc:
        _fail(str(exc), 2)
    typer.echo(f"worker {tuner_id} done")


def _print_trials(trials) -> None:
    scored = [t for t in trials if t.score is not None]
    typer.echo(f"{len(trials)} trial(s), {len(scored)} scored")
    for t in sorted(scored, key=lambda t: t.score, reverse=True)[:5]:
        typer.echo(f"  trial {t.trial_id}: score {t.score:.4f} {t.hyperparameters}")


def main() -> None:
    """Console-script entry point."""
    import os

    # Quiet third-party chatter on a terminal; users can override any of these.
    for key, value in {"GX_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2",
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
        os.environ.setdefault(key, value)
    app()


if __name__ == "__main__":
    main()
