"""Test-time augmentation folded into the saved model.

The wrapped model scores each image as it is and as a centre crop scaled back to full size
(a 10% zoom), averages the two logits and ends in its own sigmoid output layer, named like
the trained model's (``pneumonia``): a ``Dense(1)`` with weight 1 and bias 0, into which
Platt scaling fitted on the wrapper's own output folds (:mod:`cxr_core.training.calibrate`),
so calibration is the last thing the served model does. Averaging logits rather than
probabilities is what makes that exact: ``sigmoid(a * mean_logit + b)`` is Platt scaling of
the averaged output.

It is built from built-in layers around the trained model's layers, so the saved ``.keras``
file does it everywhere the model runs (``cxr predict``, MLflow's pyfunc, ``mlflow models
serve``) with nothing beside it. The cost is one extra forward pass per view.
"""

from __future__ import annotations

from typing import Any

from cxr_core.training.calibrate import OUTPUT_LAYER
from cxr_core.training.wrappers import WRAPPER_NAME, logit_model, unwrap

__all__ = ["WRAPPER_NAME", "logit_model", "unwrap", "with_tta"]


def with_tta(model: Any, image_size: int, crops: tuple[float, ...] = (0.9,)) -> Any:
    """A model averaging the logit of ``model`` over the image and one centre-crop view per
    entry of ``crops`` (the kept fraction of each side, in (0, 1)), then
    ``sigmoid(1 * mean + 0)`` in an output layer calibration can rescale."""
    import keras
    from keras import layers

    if not crops or any(not 0 < c < 1 for c in crops):
        raise ValueError(f"crops must be fractions in (0, 1), got {crops!r}")
    scorer = logit_model(model)
    inputs = keras.Input((image_size, image_size, 1), name="image")
    logits = [scorer(inputs)]
    for i, crop in enumerate(crops):
        side = max(1, round(image_size * crop))
        view = layers.CenterCrop(side, side, name=f"tta_crop_{i}")(inputs)
        view = layers.Resizing(image_size, image_size, name=f"tta_resize_{i}")(view)
        logits.append(scorer(view))
    mean = layers.Average(name="tta_mean_logit", dtype="float32")(logits)
    output = layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER,
                          kernel_initializer="ones", bias_initializer="zeros")(mean)
    return keras.Model(inputs, output, name=WRAPPER_NAME)
