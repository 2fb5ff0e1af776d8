"""Keras callbacks that search and final training share, and the direction of a monitored metric."""

from __future__ import annotations

from typing import Any

MINIMIZED = ("loss", "val_loss")  # every other monitored metric is maximised


def monitor_mode(name: str) -> str:
    """``"min"`` or ``"max"``: how a Keras callback should read the metric ``name``."""
    return "min" if name in MINIMIZED else "max"


def progress_callback(label: str) -> Any:
    """A Keras callback that prints one line per epoch (orchestrators capture prints as logs),
    so a long search or training shows where it is."""
    import time

    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            total = self.params.get("epochs", "?")
            shown = ", ".join(f"{k} {logs[k]:.4f}" for k in ("loss", "val_loss", "val_auc", "val_shift_auc",
                                                             "val_recall") if k in logs)
            print(f"[{label}] epoch {epoch + 1}/{total}: {shown} "
                  f"({time.perf_counter() - self._t0:.1f} s)", flush=True)

    return EpochProgress()


def shifted_validation(datasets: Any, seed: int) -> Any:
    """The per-epoch ``val_shift_*`` callback over a copy of the validation images shifted
    by the acquisition changes training never augments with
    (:data:`cxr_core.evaluation.robustness.UNSEEN_SHIFTS`, see ``shifted_copy``): selecting
    on shifts the augmentation covers would reward the augmentation, not robustness."""
    import numpy as np

    from cxr_core.evaluation.robustness import UNSEEN_SHIFTS, shifted_copy, shifted_validation_callback

    images = np.concatenate([x.numpy() for x, _ in datasets.val])
    return shifted_validation_callback(shifted_copy(images, seed, UNSEEN_SHIFTS),
                                       datasets.val_data.labels)


def mlflow_epoch_logger(client: Any, run_id: str) -> Any:
    """A Keras callback that logs each epoch's metrics to the MLflow run ``run_id`` as the
    epoch ends (step = epoch, wall-clock timestamp), so the UI's charts grow while training
    runs. Logging errors are printed, never raised: a flaky tracking server must not kill a
    long training."""
    import math
    import numbers
    import time

    import keras

    class MlflowEpochLogger(keras.callbacks.Callback):
        def __deepcopy__(self, memo: dict) -> MlflowEpochLogger:
            return self  # Keras Tuner deep-copies a trial's callbacks; the client must not be

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, epoch) for k, v in (logs or {}).items()
                     if isinstance(v, numbers.Real) and math.isfinite(float(v))]
            lr = getattr(getattr(self.model, "optimizer", None), "learning_rate", None)
            # The learning rate shows ReduceLROnPlateau's halvings in the UI.
            if lr is not None and "learning_rate" not in (logs or {}):
                items.append(Metric("learning_rate", float(keras.ops.convert_to_numpy(lr)), now, epoch))
            try:
                client.log_batch(run_id, metrics=items)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                print(f"[mlflow] epoch {epoch + 1} not logged to run {run_id}: {exc}", flush=True)

    return MlflowEpochLogger()
