"""Hyperparameter search with Keras Tuner: local, resumable, or distributed.

The oracle decides, the tuner executes. The tuner directory lives under the run's work
directory, so an interrupted search resumes without redoing completed trials. In distributed
mode every process runs the same code; Keras Tuner reads its role from the environment
(KERASTUNER_TUNER_ID=chief|tuner0|..., KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras_tuner as kt

from cxr_core.config import ExperimentConfig
from cxr_core.data.balance import PREPARED_MANIFEST, BalancedTrainSet, class_weight_for
from cxr_core.data.inputs import Datasets, make_datasets
from cxr_core.data.manifest import read_manifest
from cxr_core.errors import ConfigError, CxrError
from cxr_core.settings import temporary_env
from cxr_core.training.callbacks import (
    mlflow_epoch_logger,
    monitor_mode,
    progress_callback,
    shifted_validation,
)
from cxr_core.training.oracle import DONE_FILE, serve_oracle, wait_for_oracle

ORACLE_SEED_FOR_ZERO = 2**31 - 1
ROLE_ENV = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")


@dataclass
class TrialResult:
    """One trial as the tracking layer logs it (one nested run per trial)."""

    trial_id: str
    status: str
    score: float | None
    hyperparameters: dict[str, Any]
    metrics: dict[str, list[float]] = field(default_factory=dict)  # name -> value per epoch
    best_step: int | None = None
    tuner_id: str | None = None  # which process ran it (distributed mode)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


EPOCHS_FILE = "epochs.json"


class _EpochHistoryMixin:
    """Keras Tuner keeps only each trial's best epoch; this keeps every epoch's metrics in
    the trial's directory (shared in distributed mode) so each trial can be logged in full.
    When the process was given live tracking (:class:`cxr_core.lifecycle.tracking.LiveTracking`
    in its environment, as every worker of a distributed search can be), each trial is also an
    MLflow run from its first epoch to its last, with per-epoch metrics as they come.

    Each trial seeds Keras' global random state from ``seed_base`` and its trial id
    (:func:`trial_seed`) before its model is built: unseeded weight initialisers draw from
    that state, so without this a trial's starting weights depended on whatever the process
    had run before, and the same seed searched differently in two processes or workers.
    The hypermodel's ``init_seed`` gets the same seed: the initialisers then take their seeds
    from it, not from Python's global ``random``, which other threads draw from too."""

    seed_base: int = 0

    def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
        import keras

        from cxr_core.lifecycle.tracking import LiveTracking, live_run

        seed = trial_seed(self.seed_base, trial.trial_id)
        keras.utils.set_random_seed(seed)
        if hasattr(self.hypermodel, "init_seed"):  # type: ignore[attr-defined]
            self.hypermodel.init_seed = seed  # type: ignore[attr-defined]
        live = LiveTracking.from_env()
        if live is None:
            return self._run_recorded_trial(trial, *args, **kwargs)
        tags = {"cxr.stage": "tuning", "cxr.trial_id": str(trial.trial_id),
                "cxr.tuner_id": str(getattr(self, "tuner_id", None))}
        params = {f"hp.{k}": v for k, v in trial.hyperparameters.values.items()}
        with live_run(live, f"trial-{trial.trial_id}", params, tags) as (client, run_id):
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), mlflow_epoch_logger(client, run_id)]
            return self._run_recorded_trial(trial, *args, **kwargs)

    def _run_recorded_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["callbacks"] = [*kwargs.get("callbacks", []),
                               progress_callback(f"trial {trial.trial_id}")]
        histories = super().run_trial(trial, *args, **kwargs)  # type: ignore[misc]
        executions = [h.history for h in histories if hasattr(h, "history")]
        path = Path(self.get_trial_dir(trial.trial_id)) / EPOCHS_FILE  # type: ignore[attr-defined]
        path.write_text(json.dumps({
            "tuner_id": getattr(self, "tuner_id", None),
            "executions": [{k: [float(v) for v in vals] for k, vals in ex.items()}
                           for ex in executions],
        }))
        return histories


def trial_seed(seed: int, trial_id: str) -> int:
    """The global seed of one trial: stable across processes (crc32, not the salted
    ``hash``), different per trial, within Keras' range."""
    import zlib

    return zlib.crc32(f"{seed}:{trial_id}".encode()) % (2**31 - 1)


class HyperbandTuner(_EpochHistoryMixin, kt.Hyperband):
    """Hyperband that records per-epoch metrics."""


class BayesianTuner(_EpochHistoryMixin, kt.BayesianOptimization):
    """Bayesian optimisation that records per-epoch metrics."""


class RandomTuner(_EpochHistoryMixin, kt.RandomSearch):
    """Random search that records per-epoch metrics."""


def objective(name: str) -> kt.Objective:
    """A tuner objective on a compiled metric's name (``val_auc``), with its direction."""
    return kt.Objective(name, direction=monitor_mode(name))


def distributed_role() -> str | None:
    """This process's role in a distributed search, or None when it runs alone."""
    return os.environ.get("KERASTUNER_TUNER_ID") or None


def check_distributed_env() -> None:
    """Fail early with a clear message when a distributed role lacks its settings."""
    if distributed_role() is None:
        return
    missing = [k for k in ROLE_ENV if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"distributed tuning needs {', '.join(missing)} in the environment")


def default_distribution_strategy() -> Any | None:
    """MirroredStrategy when this worker sees several GPUs (one trial on all of them)."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else None


def make_tuner(
    hypermodel: kt.HyperModel,
    directory: Path,
    project_name: str = "search",
    algorithm: str = "hyperband",
    objective_name: str = "val_auc",
    max_trials: int = 12,
    max_epochs: int = 10,
    executions_per_trial: int = 1,
    seed: int = 0,
    distribution_strategy: Any | None = None,
    fixed: dict[str, Any] | None = None,
) -> kt.Tuner:
    """Build (or reload: ``overwrite=False``) the tuner whose state lives in ``directory``.
    ``fixed`` hyperparameters keep their value in every trial; the others are searched.

    ``max_trials`` counts trials already done, so a rerun only adds the missing ones. A
    changed search space needs a new ``project_name``.
    """
    common = dict(
        hypermodel=hypermodel,
        objective=objective(objective_name),
        # Keras Tuner reads seed 0 as "no seed" and draws one at random: give it a stand-in.
        seed=seed if seed else ORACLE_SEED_FOR_ZERO,
        directory=str(directory),
        project_name=project_name,
        overwrite=False,
        executions_per_trial=executions_per_trial,
        distribution_strategy=distribution_strategy,
        max_consecutive_failed_trials=3,
    )
    if fixed:
        pinned = kt.HyperParameters()
        for name, value in fixed.items():
            pinned.Fixed(name, value)
        # tune_new_entries: the hyperparameters the model registers beside them are searched.
        common.update(hyperparameters=pinned, tune_new_entries=True)
    if algorithm == "hyperband":
        tuner = HyperbandTuner(max_epochs=max_epochs, factor=3, hyperband_iterations=1, **common)
        # Hyperband sizes its brackets from max_epochs; the profile's trial budget caps it.
        tuner.oracle.max_trials = max_trials
    elif algorithm == "bayesian":
        tuner = BayesianTuner(max_trials=max_trials, **common)
    elif algorithm == "random":
        tuner = RandomTuner(max_trials=max_trials, **common)
    else:
        raise ConfigError(f"unknown tuner algorithm {algorithm!r}: hyperband, bayesian or random")
    tuner.seed_base = seed
    return tuner


def run_search(tuner: kt.Tuner, train_ds: Any, val_ds: Any, max_epochs: int, patience: int,
               steps_per_epoch: int | None = None, class_weight: dict[int, float] | None = None,
               verbose: int = 0, callbacks: list[Any] | None = None) -> list[TrialResult]:
    """Run (or resume) the search; returns every trial's result. ``callbacks`` run before
    early stopping, so metrics they add (``val_shift_auc``) can be the objective.

    On the chief of a distributed search this serves the oracle until the workers finish.
    """
    import keras

    callbacks = list(callbacks or [])
    if patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=tuner.oracle.objective.name, mode=tuner.oracle.objective.direction,
            patience=patience, restore_best_weights=False))
    fit_kwargs: dict[str, Any] = dict(validation_data=val_ds, epochs=max_epochs, shuffle=False,
                                      callbacks=callbacks, verbose=verbose)
    if steps_per_epoch:
        fit_kwargs["steps_per_epoch"] = steps_per_epoch
    if class_weight:
        fit_kwargs["class_weight"] = class_weight
    tuner.search(train_ds, **fit_kwargs)
    return collect_trials(tuner)


def _trials_of(tuner: kt.Tuner) -> dict[str, Any]:
    """trial_id -> Trial. A distributed worker's oracle is a gRPC client without the trial
    table, so it reads the trials the chief saved in the shared directory instead."""
    oracle = tuner.oracle
    if type(oracle).__name__ != "OracleClient":
        return dict(oracle.trials)
    from keras_tuner.src.engine.trial import Trial

    trials = {}
    for f in sorted(Path(tuner.project_dir).glob("trial_*/trial.json")):
        trial = Trial.load(str(f))
        trials[trial.trial_id] = trial
    return trials


def collect_trials(tuner: kt.Tuner) -> list[TrialResult]:
    """Per-trial hyperparameters, per-epoch metrics (first execution) and score, in trial
    order. Trials run by other workers are included: their epochs live in the shared dir."""
    results = []
    for trial_id, trial in sorted(_trials_of(tuner).items()):
        epochs_file = Path(tuner.project_dir) / f"trial_{trial_id}" / EPOCHS_FILE
        metrics: dict[str, list[float]] = {}
        tuner_id = None
        if epochs_file.is_file():
            record = json.loads(epochs_file.read_text())
            metrics = record["executions"][0] if record["executions"] else {}
            tuner_id = record.get("tuner_id")
        results.append(TrialResult(
            trial_id=str(trial_id),
            status=str(trial.status),
            score=None if trial.score is None else float(trial.score),
            hyperparameters=dict(trial.hyperparameters.values),
            metrics=metrics,
            best_step=trial.best_step,
            tuner_id=tuner_id,
        ))
    return results


def best_hyperparameters(tuner: kt.Tuner) -> dict[str, Any]:
    """The best completed trial's hyperparameter values (Hyperband's bookkeeping removed)."""
    best = tuner.get_best_hyperparameters(1)
    if not best:
        raise CxrError("the search finished no trial successfully")
    return {k: v for k, v in best[0].values.items() if not k.startswith("tuner/")}


def hypermodel_for(cfg: ExperimentConfig) -> Any:
    """The search space of ``cfg`` (image size, augmentation and robust-training options)."""
    from cxr_core.training.model import CxrHyperModel

    return CxrHyperModel(cfg.data.image_size, augment=cfg.balance.augment,
                         mixed_precision=cfg.train.mixed_precision, seed=cfg.seed,
                         intensity_norm=cfg.train.intensity_norm,
                         label_smoothing=cfg.train.label_smoothing,
                         mask=cfg.train.mask_annotations, crop=cfg.train.lung_crop.as_tuple(),
                         mask_fill=cfg.train.mask_fill)


def tuner_for(cfg: ExperimentConfig, work_dir: Path, distribution_strategy: Any | None = None) -> kt.Tuner:
    """The tuner of ``cfg`` whose state lives in ``work_dir/tuner`` (new or resumed): the one
    place the search, the distributed chief and the read-back of a finished search build it."""
    return make_tuner(
        hypermodel_for(cfg), Path(work_dir) / "tuner", algorithm=cfg.tune.algorithm,
        objective_name=cfg.tune.objective, max_trials=cfg.tune.max_trials,
        max_epochs=cfg.tune.max_epochs, executions_per_trial=cfg.tune.executions_per_trial,
        seed=cfg.seed, distribution_strategy=distribution_strategy, fixed=cfg.tune.fixed)


def tune(datasets: Datasets, cfg: ExperimentConfig, work_dir: Path,
         verbose: int = 0) -> tuple[kt.Tuner, list[TrialResult]]:
    """Run or resume the search whose state lives in ``work_dir/tuner``; returns
    ``(tuner, trial results)``."""
    check_distributed_env()
    tuner = tuner_for(cfg, work_dir, default_distribution_strategy())
    trials = run_search(tuner, datasets.train, datasets.val, cfg.tune.max_epochs,
                        cfg.train.early_stopping_patience, datasets.steps_per_epoch,
                        datasets.class_weight, verbose=verbose,
                        callbacks=[shifted_validation(datasets, cfg.seed)])
    return tuner, trials


def wait_for_manifest(work_dir: Path, timeout_s: float = 600.0, poll_s: float = 1.0) -> Path:
    """Block until the chief has prepared the manifest (workers start before it is ready)."""
    import time

    out = Path(work_dir) / PREPARED_MANIFEST
    deadline = time.monotonic() + timeout_s
    while not out.is_file():
        if time.monotonic() > deadline:
            raise CxrError(f"{out} did not appear within {timeout_s:.0f} s: is the chief running?")
        time.sleep(poll_s)
    return out


GONE_DIR = "workers-gone"  # under work_dir/tuner: one empty file per worker that is gone


def mark_worker_gone(work_dir: Path, tuner_id: str) -> None:
    """Tell the chief that ``tuner_id`` will not (or no longer) run trials: a run that never
    started or that died. Its ongoing trial is handed to another worker."""
    d = Path(work_dir) / "tuner" / GONE_DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / tuner_id).touch()


def tune_from_manifest(work_dir: Path, cfg: ExperimentConfig, chief: bool = False,
                       verbose: int = 0, expected_workers: list[str] | None = None,
                       join_timeout_s: float = 600.0) -> tuple[kt.Tuner, list[TrialResult]]:
    """Tune over the prepared manifest in ``work_dir``. The chief of a distributed search
    builds no datasets: it only serves the oracle, until every expected worker has been told
    to stop or is gone (see :func:`serve_oracle`)."""
    if chief:

        check_distributed_env()
        tuner = tuner_for(cfg, work_dir)
        tuner.save()
        serve_oracle(tuner.oracle, expected_workers or [], Path(work_dir) / "tuner" / GONE_DIR,
                     join_timeout_s)
        (Path(work_dir) / "tuner" / DONE_FILE).touch()
        return tuner, collect_trials(tuner)
    from cxr_core.data.inputs import configure_tensorflow

    # Before the first op: thread pools, and GPU memory growth so workers can share a card.
    configure_tensorflow(cfg.data.intra_op_threads, cfg.data.inter_op_threads)
    manifest = read_manifest(Path(work_dir) / PREPARED_MANIFEST)
    balanced = BalancedTrainSet(manifest, None, class_weight_for(manifest, cfg))
    return tune(make_datasets(balanced, cfg, cfg.tune.train_fraction), cfg, work_dir,
                verbose=verbose)


@contextmanager
def role(tuner_id: str, oracle_ip: str, oracle_port: int) -> Iterator[None]:
    """Make this process ``tuner_id`` (``chief``, ``tuner0``, ...) of a distributed search
    for the ``with`` block: Keras Tuner reads its role from the environment. The previous
    values come back afterwards, so a later search in the same process (a test, a flow run
    in-process) is not silently turned into a worker of a chief that is gone."""
    with temporary_env({"KERASTUNER_TUNER_ID": tuner_id, "KERASTUNER_ORACLE_IP": oracle_ip,
                        "KERASTUNER_ORACLE_PORT": str(oracle_port)}):
        yield


def run_worker(work_dir: Path, cfg: ExperimentConfig, tuner_id: str, oracle_ip: str,
               oracle_port: int, wait_s: float = 600.0) -> list[TrialResult]:
    """One worker of a distributed search: wait for the chief's prepared manifest, then run
    the trials the chief hands out until the budget is spent. Returns every trial's result
    (``tuner_id`` tells which ran here)."""
    if tuner_id == "chief":
        raise CxrError("a worker's tuner id must not be 'chief'")

    with role(tuner_id, oracle_ip, oracle_port):
        wait_for_manifest(Path(work_dir), timeout_s=wait_s)
        if not wait_for_oracle(oracle_ip, oracle_port, Path(work_dir), timeout_s=wait_s):
            # A late worker: the search finished without it. Nothing to do, and no hang.
            return collect_finished(Path(work_dir), cfg)
        _, trials = tune_from_manifest(Path(work_dir), cfg, chief=False)
    return trials


def collect_finished(work_dir: Path, cfg: ExperimentConfig) -> list[TrialResult]:
    """Every trial of a finished search, read back from its directory (no role)."""
    saved = {k: os.environ.pop(k) for k in ROLE_ENV if k in os.environ}
    try:
        return collect_trials(finished_tuner(cfg, work_dir))
    finally:
        os.environ.update(saved)


def finished_tuner(cfg: ExperimentConfig, work_dir: Path) -> kt.Tuner:
    """The tuner of a finished (possibly distributed) search, with the oracle's trials. Keras
    Tuner reloads the oracle only together with ``tuner0.json``, which is missing when
    worker tuner0 never ran (late, killed): then the chief's oracle.json is read directly."""
    tuner = tuner_for(cfg, work_dir)
    if not tuner.oracle.trials and (Path(tuner.project_dir) / "oracle.json").is_file():
        tuner.oracle.reload()
    return tuner
