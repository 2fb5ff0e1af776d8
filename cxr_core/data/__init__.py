"""Data: scan a folder into a manifest, split by patient, validate, balance, synthesize, and
the tf.data input pipeline."""
