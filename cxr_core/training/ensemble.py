"""Several trained models saved as one: the mean of their logits, in one ``.keras`` file.

Members are trained alike except for their seed (initialisation, augmentation draws,
dropout), so their errors differ in part and the mean ranks better than most members (the
seed ensembles of ``benchmarks/external.py``). The wrapper is built from built-in layers,
like the test-time-augmentation wrapper, and ends in a ``pneumonia`` sigmoid layer with
weight 1 and bias 0 into which Platt scaling folds; TTA can wrap it in turn.
"""

from __future__ import annotations

from typing import Any

from cxr_core.training.wrappers import ENSEMBLE_NAME, logit_model

__all__ = ["ENSEMBLE_NAME", "ensemble_model"]


def ensemble_model(models: list[Any], image_size: int) -> Any:
    """One model whose output is ``sigmoid(mean of the members' logits)``."""
    import keras
    from keras import layers

    from cxr_core.training.calibrate import OUTPUT_LAYER

    if len(models) < 2:
        raise ValueError(f"an ensemble needs two members or more, got {len(models)}")
    inputs = keras.Input((image_size, image_size, 1), name="image")
    logits = []
    for k, member in enumerate(models):
        scorer = logit_model(member)
        scorer.name = f"member{k}"  # nested models need distinct names to be saved
        logits.append(scorer(inputs))
    mean = layers.Average(name="ensemble_mean_logit", dtype="float32")(logits)
    output = layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER,
                          kernel_initializer="ones", bias_initializer="zeros")(mean)
    return keras.Model(inputs, output, name=ENSEMBLE_NAME)
