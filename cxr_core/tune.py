"""Hyperparameter search with Keras Tuner: local, resumable, or distributed.

The oracle decides, the tuner executes. The tuner directory lives under the run's work
directory, so an interrupted search resumes without redoing completed trials. In distributed
mode every process runs the same code; Keras Tuner reads its role from the environment
(KERASTUNER_TUNER_ID=chief|tuner0|..., KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras_tuner as kt

MINIMIZED = ("loss", "val_loss")
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
    the trial's directory (shared in distributed mode) so each trial can be logged in full."""

    def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
        from cxr_core.train import progress_callback

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


class HyperbandTuner(_EpochHistoryMixin, kt.Hyperband):
    """Hyperband that records per-epoch metrics."""


class BayesianTuner(_EpochHistoryMixin, kt.BayesianOptimization):
    """Bayesian optimisation that records per-epoch metrics."""


class RandomTuner(_EpochHistoryMixin, kt.RandomSearch):
    """Random search that records per-epoch metrics."""


def objective(name: str) -> kt.Objective:
    """A tuner objective on a compiled metric's name (``val_auc``), with its direction."""
    return kt.Objective(name, direction="min" if name in MINIMIZED else "max")


def distributed_role() -> str | None:
    """This process's role in a distributed search, or None when it runs alone."""
    return os.environ.get("KERASTUNER_TUNER_ID") or None


def check_distributed_env() -> None:
    """Fail early with a clear message when a distributed role lacks its settings."""
    if distributed_role() is None:
        return
    missing = [k for k in ROLE_ENV if not os.environ.get(k)]
    if missing:
        from cxr_core.errors import ConfigError

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
) -> kt.Tuner:
    """Build (or reload: ``overwrite=False``) the tuner whose state lives in ``directory``.

    ``max_trials`` counts trials already done, so a rerun only adds the missing ones. A
    changed search space needs a new ``project_name``.
    """
    common = dict(
        hypermodel=hypermodel,
        objective=objective(objective_name),
        seed=seed,
        directory=str(directory),
        project_name=project_name,
        overwrite=False,
        executions_per_trial=executions_per_trial,
        distribution_strategy=distribution_strategy,
        max_consecutive_failed_trials=3,
    )
    if algorithm == "hyperband":
        tuner = HyperbandTuner(max_epochs=max_epochs, factor=3, hyperband_iterations=1, **common)
        # Hyperband sizes its brackets from max_epochs; the profile's trial budget caps it.
        tuner.oracle.max_trials = max_trials
    elif algorithm == "bayesian":
        tuner = BayesianTuner(max_trials=max_trials, **common)
    elif algorithm == "random":
        tuner = RandomTuner(max_trials=max_trials, **common)
    else:
        from cxr_core.errors import ConfigError

        raise ConfigError(f"unknown tuner algorithm {algorithm!r}: hyperband, bayesian or random")
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
        from cxr_core.errors import CxrError

        raise CxrError("the search finished no trial successfully")
    return {k: v for k, v in best[0].values.items() if not k.startswith("tuner/")}
