"""Lifecycle: MLflow tracking, the model registry and promotion, model cards, prediction and
S3 storage."""
