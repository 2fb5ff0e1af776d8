"""Training: the architectures, the Keras Tuner search, final training with its threshold,
calibration and test-time augmentation."""
