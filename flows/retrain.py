"""The retraining flow: validate -> balance -> tune -> train -> evaluate -> gate -> register,
with external sets scanned beside validation and scored after evaluation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cxr_core import stages
from cxr_core.config import load_config
from cxr_core.errors import CxrError, GateRejected
from cxr_core.settings import Settings, get_settings
from flows import tasks
from flows.run_spec import (
    RunSpec,
    check_resume_args,
    create_run,
    default_profile,
    load_run,
    record_data,
)


def ensure_demo_data(settings: Settings, n_per_class: int, size: int, seed: int) -> Path:
    """The synthetic demo data set under the state home, generated on first use."""
    from cxr_core.data.synth import synthesize_dataset

    root = settings.demo_data_dir / f"n{n_per_class}-s{size}-seed{seed}"
    if not (root / "train").is_dir():
        synthesize_dataset(root, n_per_class=n_per_class, size=size, seed=seed)
    return root


def _summary_markdown(result: dict[str, Any], decision: Any, evaluation: Any,
                      external: dict[str, Any] | None = None, site: Any | None = None) -> str:
    """The Prefect summary: registry outcome, test metrics, external sets (with the gap to
    the test split) and the site threshold (a SiteThreshold), gates."""
    from cxr_core.lifecycle.model_card import external_section, metrics_table, site_threshold_text

    version = result.get("model_version")
    return f"""# cxr retrain: {'registered version ' + version if version else 'not registered'}

- MLflow run: {result['mlflow_run_url']}
- Model: {result.get('model_uri') or 'none (gates rejected the candidate)'}
- Work directory: `{result['run_dir']}`

## Test metrics (at threshold {result['threshold']:.4f}, 95% bootstrap intervals)
{metrics_table(evaluation)}

## External validation
{external_section(evaluation, external)}{site_threshold_text(site)}

## Gates
```
{decision.summary()}
```
"""


@flow(name="retrain", log_prints=True)
def retrain_flow(data_dir: str | None = None, profile: str | None = None,
                 config: str | None = None, tuner_workers: int = 0,
                 resume: str | None = None, external: dict[str, str] | None = None,
                 calibration: str | None = None, unlabeled: str | None = None) -> dict[str, Any]:
    """Retrain on ``data_dir`` (default: the synthetic demo set) with a config profile
    (default: 'full' with a data folder, 'quick' without); ends Failed with the reason when
    validation or the gates reject. ``tuner_workers`` > 0 runs the search distributed: that
    many workers as runs of the tuner-worker deployment (e.g. on the gpu pool), the chief
    beside this flow. ``resume`` names an earlier run (its work directory under <home>/runs)
    to continue with the data folder, profile and config it started with: completed tuner
    trials are not rerun, and changed data is refused. ``external``: name -> folder of
    external validation sets (merged over the config's ``data.external``), scored after
    training; ``calibration``: a labelled sample of the deployment site, on which a site
    threshold is chosen beside the model's own; ``unlabeled``: images of the deployment
    site without labels, pseudo-labeled by the model for a further round of training
    (``train.pseudo_label``). All are checked before anything runs."""
    logger = get_run_logger()
    settings = get_settings()
    spec = open_run(settings, data_dir, profile, config, resume, external, calibration,
                    unlabeled)
    logger.info("run dir %s, data %s, profile %s, tracking %s", spec.run_dir, spec.data_dir,
                spec.profile, settings.mlflow_tracking_uri)
    logger.info("if this run is interrupted, continue it with: %s", spec.resume_command)
    try:
        return _retrain(settings, spec, tuner_workers, resumed=bool(resume))
    except CxrError as exc:
        exc.details.setdefault("run_dir", str(spec.run_dir))  # reports name the work directory
        raise


def open_run(settings: Settings, data_dir: str | None, profile: str | None,
             config: str | None, resume: str | None, external: dict[str, str] | None = None,
             calibration: str | None = None, unlabeled: str | None = None) -> RunSpec:
    """The run to work in: the stored inputs of ``resume`` (explicit ones must agree), or a
    new work directory recording these inputs (the demo data set when ``data_dir`` is None).
    External sets, the calibration and unlabeled folders are checked here, before anything
    runs."""
    from cxr_core.data.external import check_calibration_folder, resolve_external_sets
    from cxr_core.data.unlabeled import check_unlabeled_folder

    if resume:
        spec = load_run(settings.runs_dir, resume)
        check_resume_args(spec, data_dir, profile, config, external, calibration, unlabeled)
        return spec
    profile = profile or default_profile(data_dir)
    cfg = load_config(Path(config) if config else None, profile)
    sets = resolve_external_sets(cfg, external)
    site = check_calibration_folder(calibration) if calibration else None
    site_images = check_unlabeled_folder(unlabeled) if unlabeled else None
    data = Path(data_dir) if data_dir else ensure_demo_data(
        settings, cfg.synth.n_per_class, cfg.synth.size, cfg.seed)
    return create_run(settings.runs_dir, data, profile, cfg, sets, site, site_images)


@dataclass
class _Outcome:
    """What the stages produced, for the result, the artifacts and the gate verdict."""

    spec: RunSpec
    refs: Any
    uploaded: list[str]
    trials: list[Any]
    trained: Any
    evaluated: Any
    decision: Any
    timings: dict[str, float]
    external: Any = None  # stages.ExternalData


def _retrain(settings: Settings, spec: RunSpec, tuner_workers: int, resumed: bool) -> dict[str, Any]:
    """Track, run the stages, publish the result; GateRejected (with the result in its
    details) when the gates reject."""
    uri = settings.mlflow_tracking_uri
    cfg = spec.config()
    refs = tasks.start_tracking(uri, settings.experiment_name, cfg, spec.run_dir, spec.data_dir,
                                settings.artifact_location)
    try:
        outcome = _stages(settings, spec, cfg, refs, tuner_workers, resumed)
    except BaseException:
        _end_parent_run(uri, refs.parent_run_id)
        raise
    result = _result(settings, outcome)
    get_run_logger().info("stage times (s): %s", result["stage_seconds"])
    _publish_artifacts(result, outcome)
    if not outcome.decision.passed:
        rejected = GateRejected(f"gates rejected the candidate (logged, not registered):\n"
                                f"{outcome.decision.summary()}", outcome.decision)
        rejected.details.update(result)
        raise rejected
    return result


def _stages(settings: Settings, spec: RunSpec, cfg: Any, refs: Any, tuner_workers: int,
            resumed: bool) -> _Outcome:
    """validate -> balance -> tune -> train -> evaluate -> gate -> log and register."""
    from cxr_core.data.manifest import listing_fingerprint

    logger = get_run_logger()
    uri, model_name, run_dir = settings.mlflow_tracking_uri, settings.registered_model_name, spec.run_dir
    timings: dict[str, float] = {}
    with _timed(timings, "validate"):
        fingerprint = listing_fingerprint(spec.data_dir)
        if resumed:
            tasks.check_resume_data(spec, cfg, fingerprint)
        validated = tasks.validated_data(spec.data_dir, cfg, run_dir)
        spec = record_data(spec, validated.manifest_hash, fingerprint)
        # Scanned now (a bad set fails before training), scored only once the model exists.
        external = tasks.scan_external(spec.external, spec.calibration, validated.manifest_path,
                                       cfg, run_dir, spec.unlabeled)
    live = stages.live_tracking(uri, refs, validated, cfg)  # trials and training log as they run
    with _timed(timings, "balance"):
        prepared = tasks.balance(validated.manifest_path, cfg, run_dir)
        uploaded = tasks.upload_data_artifacts(run_dir)
    if uploaded:
        logger.info("data artifacts: %d file(s) under %s", len(uploaded),
                    uploaded[0].rsplit("/", 1)[0])
    with _timed(timings, "tune"):
        if tuner_workers > 0:
            trials, best_hp = tasks.distributed_tune(
                run_dir, cfg, tuner_workers, tasks.FanOut.from_settings(settings),
                spec.profile, str(spec.config_path), live)
        else:
            trials, best_hp = tasks.tune(run_dir, cfg, live)
    logger.info("search: %d trials, best %s", len(trials), best_hp)
    with _timed(timings, "train"):
        trained = tasks.train(run_dir, cfg, best_hp, live, external.unlabeled_paths)
    with _timed(timings, "evaluate"):
        evaluated = tasks.evaluate(run_dir, cfg, prepared)
        evaluated = tasks.score_external(run_dir, cfg, evaluated, external)
        comparisons, champion = tasks.compare_with_champion(uri, model_name, evaluated.predictions_path)
        decision = tasks.gate(evaluated, cfg, comparisons, champion)
    with _timed(timings, "log_and_register"):
        refs = tasks.log_results(uri, refs, model_name, cfg, run_dir, validated, trials, trained,
                                 evaluated, decision, external)
        refs = tasks.register(uri, refs, model_name, decision, trained, evaluated,
                              validated.manifest_hash)
    return _Outcome(spec, refs, uploaded, trials, trained, evaluated, decision, timings, external)


def _result(settings: Settings, o: _Outcome) -> dict[str, Any]:
    """The run's result: registry outcome, metrics, hyperparameters and stage times."""
    uri, name = settings.mlflow_tracking_uri, settings.registered_model_name
    return {
        "run_dir": str(o.spec.run_dir),
        "data_dir": str(o.spec.data_dir),
        "profile": o.spec.profile,
        "mlflow_run_id": o.refs.parent_run_id,
        "mlflow_final_run_id": o.refs.final_run_id,
        "mlflow_run_url": _run_link(uri, o.refs.experiment_id, o.refs.parent_run_id),
        "model_version": o.refs.model_version,
        "model_uri": f"models:/{name}/{o.refs.model_version}" if o.refs.model_version else None,
        "threshold": o.trained.threshold.threshold,
        "gate_passed": o.decision.passed,
        "data_artifacts": o.uploaded,
        "test_metrics": o.evaluated.evaluation.point(),
        "external_metrics": {name: ev.point() for name, ev in o.evaluated.external.items()},
        "external_sets": o.external.summary() if o.external else {},
        "site_threshold": _site_result(o.evaluated.site_threshold),
        "robust_worst": {k.removeprefix("robust_worst_"): v
                         for k, v in o.evaluated.robustness.items()
                         if k.startswith("robust_worst_")},
        "calibration": o.trained.calibration,
        "pseudo_labels": o.trained.pseudo_labels,
        "ensemble_members": o.trained.members,
        "best_hyperparameters": o.trained.hyperparameters,
        "trials": len(o.trials),
        "stage_seconds": {k: round(v, 1) for k, v in o.timings.items()},
    }


def _site_result(site: Any | None) -> dict[str, Any] | None:
    """The site threshold for the result (None without a calibration sample)."""
    if site is None:
        return None
    return {"threshold": site.threshold, "recall": site.recall, "specificity": site.specificity,
            "images": site.images, "source": site.source}


def _publish_artifacts(result: dict[str, Any], o: _Outcome) -> None:
    """Prefect artifacts: the summary, the test metrics and the tuner trials."""
    create_markdown_artifact(key="retrain-summary",
                             markdown=_summary_markdown(result, o.decision, o.evaluated.evaluation,
                                                        o.evaluated.external,
                                                        o.evaluated.site_threshold),
                             description="Test metrics, gate decision and registry outcome")
    create_table_artifact(key="test-metrics", table=[
        {"metric": k, "value": round(iv.value, 4), "ci_low": round(iv.low, 4),
         "ci_high": round(iv.high, 4)} for k, iv in o.evaluated.evaluation.metrics.items()])
    create_table_artifact(key="tuner-trials", table=[
        {"trial": t.trial_id, "score": t.score, "status": t.status,
         **{k: v for k, v in t.hyperparameters.items() if not k.startswith("tuner/")}}
        for t in o.trials])


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Record the wall time of a stage (reported in the result and the benchmarks)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def _run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A clickable UI link for a tracking server; the store and ids otherwise."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{tracking_uri} (experiment {experiment_id}, run {run_id}; open with `mlflow ui`)"


def _end_parent_run(tracking_uri: str, run_id: str) -> None:
    """Mark the pipeline's MLflow run FAILED; best effort (the original error matters)."""
    try:
        from cxr_core.lifecycle.tracking import make_client

        client = make_client(tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001
        pass
