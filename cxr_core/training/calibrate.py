"""Probability calibration fitted on validation data and folded into the model.

Mixup and label smoothing make a model under-confident, and a model trained on balanced
classes over-predicts the minority class: its probabilities stop meaning "chance of
pneumonia". Platt scaling, ``p = sigmoid(a * z + b)`` on the model's logit ``z``, fixes both.
Because the output layer is ``sigmoid(w . h + c)``, the scaling folds exactly into it
(``w <- a w``, ``c <- a c + b``): the calibrated model has the same layers, loads anywhere
(MLflow's pyfunc included) and needs nothing beside it. Ranking (AUC) is unchanged.
A test-time-augmentation wrapper (:mod:`cxr_core.training.tta`) ends in such a layer too, over
the mean logit of its views: the scaling is fitted on, and folded into, whatever model is
saved, so it is always the last step of the served output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

OUTPUT_LAYER = "pneumonia"
_EPS = 1e-7


@dataclass(frozen=True)
class PlattScaling:
    """``p = sigmoid(a * logit + b)``; ``a > 0`` keeps the ranking."""

    a: float
    b: float

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from uncalibrated ones."""
        z = logit(probs)
        return 1.0 / (1.0 + np.exp(-(self.a * z + self.b)))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def logit(probs: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), with p clipped away from 0 and 1 (float32 sigmoids saturate)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def fit_platt(probs: np.ndarray, labels: np.ndarray) -> PlattScaling:
    """Fit Platt scaling by maximum likelihood on validation probabilities and labels.

    Raises ValueError when the labels hold a single class (nothing to calibrate against) or
    the fit would reverse the ranking (a <= 0: the model is worse than chance there).
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(labels).astype(int).ravel()
    if len(np.unique(y)) < 2:
        raise ValueError("calibration needs both classes in the validation labels")
    z = logit(probs).reshape(-1, 1)
    # A very large C is (almost) unregularized maximum likelihood, which is Platt's method.
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(z, y)
    a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if a <= 0:
        raise ValueError(f"calibration slope {a:.3g} <= 0: the model ranks validation "
                         f"images worse than chance")
    return PlattScaling(a, b)


def fold_into_model(model: Any, scaling: PlattScaling) -> Any:
    """Rescale the model's top-level sigmoid output layer (the trained model's, or a TTA
    wrapper's) in place, so the model outputs calibrated probabilities."""
    layer = model.get_layer(OUTPUT_LAYER)
    kernel, bias = (np.asarray(w, dtype=np.float64) for w in layer.get_weights())
    layer.set_weights([(scaling.a * kernel).astype(np.float32),
                       (scaling.a * bias + scaling.b).astype(np.float32)])
    return model

