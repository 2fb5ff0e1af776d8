"""Test-time augmentation folded into the saved model.

The wrapped model scores each image as it is and as a centre crop scaled back to full size
(a 10% zoom), and averages the two probabilities. It is built from built-in layers around the
trained model, so the saved ``.keras`` file does it everywhere the model runs (``cxr
predict``, MLflow's pyfunc, ``mlflow models serve``) with nothing beside it. The cost is one
extra forward pass per view.
"""

from __future__ import annotations

from typing import Any

WRAPPER_NAME = "cxr_cnn_tta"


def with_tta(model: Any, image_size: int, crops: tuple[float, ...] = (0.9,)) -> Any:
    """A model averaging ``model`` over the image and one centre-crop view per entry of
    ``crops`` (the kept fraction of each side, in (0, 1))."""
    import keras
    from keras import layers

    if not crops or any(not 0 < c < 1 for c in crops):
        raise ValueError(f"crops must be fractions in (0, 1), got {crops!r}")
    inputs = keras.Input((image_size, image_size, 1), name="image")
    outputs = [model(inputs)]
    for i, crop in enumerate(crops):
        side = max(1, round(image_size * crop))
        view = layers.CenterCrop(side, side, name=f"tta_crop_{i}")(inputs)
        view = layers.Resizing(image_size, image_size, name=f"tta_resize_{i}")(view)
        outputs.append(model(view))
    averaged = layers.Average(name="pneumonia_tta", dtype="float32")(outputs)
    return keras.Model(inputs, averaged, name=WRAPPER_NAME)


def unwrap(model: Any) -> Any:
    """The trained model inside a TTA wrapper (for Grad-CAM), or ``model`` itself."""
    if getattr(model, "name", None) != WRAPPER_NAME:
        return model
    import keras

    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(inner) != 1:
        raise ValueError(f"a TTA wrapper should hold one model, found {len(inner)}")
    return inner[0]
