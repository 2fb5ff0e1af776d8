"""The class and split names every stage agrees on (one definition each)."""

from __future__ import annotations

LABELS: tuple[str, str] = ("NORMAL", "PNEUMONIA")  # index = the integer label (0, 1)
POSITIVE = "PNEUMONIA"  # the class whose recall the gates guard
SPLITS: tuple[str, str, str] = ("train", "val", "test")
# split_origin of the manifest rows of augmented variants written by offline balancing.
AUGMENTED_ORIGIN = "augmented"
