"""The names of the wrappers built around a trained model (test-time augmentation,
ensembles), the logit scorer they share, and the way back to the trained model inside."""

from __future__ import annotations

from typing import Any

from cxr_core.training.calibrate import OUTPUT_LAYER

WRAPPER_NAME = "cxr_cnn_tta"   # cxr_core.training.tta
ENSEMBLE_NAME = "cxr_ensemble"  # cxr_core.training.ensemble


def logit_model(model: Any) -> Any:
    """``model`` up to the logit of its sigmoid output layer: the same layers (shared, not
    copied) and a linear copy of the output layer."""
    import keras
    from keras import layers

    head = model.get_layer(OUTPUT_LAYER)
    linear = layers.Dense(1, dtype="float32", name=f"{OUTPUT_LAYER}_logit")
    z = linear(head.input)
    linear.set_weights(head.get_weights())
    return keras.Model(model.inputs, z, name=f"{model.name}_logit")


def unwrap(model: Any) -> Any:
    """The trained model's logit scorer inside a TTA wrapper (for Grad-CAM, which explains
    the logit), or ``model`` itself. In an ensemble
    (:mod:`cxr_core.training.ensemble`), the first member's: Grad-CAM and the drift
    embedding explain one member, not the mean."""
    import keras

    while getattr(model, "name", None) == WRAPPER_NAME or str(
            getattr(model, "name", "")).startswith(ENSEMBLE_NAME):
        inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
        if model.name == WRAPPER_NAME and len(inner) != 1:
            raise ValueError(f"a TTA wrapper should hold one model, found {len(inner)}")
        if not inner:
            raise ValueError(f"{model.name} holds no model")
        model = inner[0]
    return model
