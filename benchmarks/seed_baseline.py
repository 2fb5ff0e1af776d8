"""The seed project's model (RGB 128 px, five twin-Conv2D blocks, Flatten + Dense 512): the
baseline ``train_throughput.py`` measures cxr's architecture against. Not part of the library."""

from __future__ import annotations

import keras
from keras import layers

from cxr_core.training.model import compiled_metrics


def seed_baseline(image_size: int = 128, learning_rate: float = 1e-3) -> keras.Model:
    """The approach of the notebooks cxr replaces, kept only as a benchmark reference:
    RGB input, five blocks of twin Conv2D + BatchNorm + MaxPool, Flatten, Dense 512, Dropout,
    sigmoid. Takes 0-255 RGB pixels (gray input is repeated to three channels)."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    for filters in (16, 32, 64, 128, 256):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    model = keras.Model(inputs, outputs, name="seed_baseline")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="binary_crossentropy", metrics=compiled_metrics())
    return model
