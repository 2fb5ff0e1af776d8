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
