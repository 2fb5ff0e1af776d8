"""Batch prediction: files and folders in, path/probability/label out, at the model's own
threshold. Unreadable files are reported and skipped; the run never crashes on one."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_core.data.labels import LABELS
from cxr_core.data.manifest import JUNK_DIRS, _inspect_all, _is_junk_name, is_image_path
from cxr_core.errors import CxrError, InputError
from cxr_core.training.fit import MODEL_FILE, THRESHOLD_FILE, load_threshold


@dataclass
class LoadedModel:
    """A Keras model with the operating threshold that travelled with it."""

    model: Any
    threshold: float
    image_size: int
    source: str
    _predict_file: Any = field(default=None, repr=False, compare=False)
    # The drift reference that travelled with the model (cxr_core.evaluation.drift), if any.
    reference_path: Path | None = field(default=None, compare=False)
    # The threshold a site-calibration sample chose (site_threshold.json), if any; the
    # model's own ``threshold`` is what predictions use unless told otherwise.
    site_threshold: float | None = None

    def at_site_threshold(self) -> LoadedModel:
        """This model predicting at its site threshold; InputError when it has none."""
        import dataclasses

        if self.site_threshold is None:
            raise InputError(f"{self.source}: no site threshold (register a model trained with "
                           "`cxr run --calibration DIR` to have one)")
        return dataclasses.replace(self, threshold=self.site_threshold, _predict_file=None)

    def predict_file(self, path: str) -> float:
        """Probability for one image file: decode, resize and model in one compiled graph
        (eager op-by-op dispatch would cost more than the model itself)."""
        if self._predict_file is None:
            import tensorflow as tf

            from cxr_core.data.inputs import decode_image

            @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
            def fused(p):
                x = tf.cast(decode_image(p, self.image_size), tf.float32)[tf.newaxis]
                return self.model(x, training=False)[0, 0]

            self._predict_file = fused
        return float(self._predict_file(path))

    def predict_arrays(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Probabilities for raw 0-255 images [N, S, S, 1]."""
        if len(images) <= batch_size:
            # Direct call: model.predict's per-call setup dominates single-image latency.
            return np.asarray(self.model(images, training=False), np.float64).ravel()
        return np.asarray(self.model.predict(images, batch_size=batch_size, verbose=0),
                          np.float64).ravel()


def _find(root: Path, name: str) -> Path | None:
    hits = sorted(root.rglob(name))
    return hits[0] if hits else None


def load_model_dir(model_dir: Path, source: str | None = None) -> LoadedModel:
    """Load from a folder holding ``model.keras`` and ``threshold.json`` anywhere below it
    (a training output folder, or a downloaded MLflow ``mlflow.keras`` model)."""
    import keras

    model_dir = Path(model_dir)
    keras_file = _find(model_dir, MODEL_FILE)
    threshold_file = _find(model_dir, THRESHOLD_FILE)
    if keras_file is None:
        raise CxrError(f"{model_dir}: no model.keras found")
    if threshold_file is None:
        raise CxrError(f"{model_dir}: no threshold.json found (the operating threshold travels "
                       "with every cxr model)")
    model = keras.models.load_model(keras_file)
    threshold = load_threshold(threshold_file.parent).threshold
    from cxr_core.evaluation.drift import REFERENCE_FILE
    from cxr_core.evaluation.external import SITE_THRESHOLD_FILE, load_site_threshold

    site_file = _find(model_dir, SITE_THRESHOLD_FILE)
    return LoadedModel(model, threshold, int(model.input_shape[1]), source or str(model_dir),
                       reference_path=_find(model_dir, REFERENCE_FILE),
                       site_threshold=load_site_threshold(site_file).threshold if site_file else None)


def resolve_model_version(client: Any, model_uri: str) -> Any:
    """The registry version behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    ref = model_uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = ref.partition("/")
        if not version:
            raise CxrError(f"{model_uri}: give models:/NAME@ALIAS or models:/NAME/VERSION")
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise CxrError(f"{model_uri}: {exc.message}") from exc


def model_artifact_uri(client: Any, model_uri: str) -> str:
    """Where a model's files are, asked of the registry rather than parsed from a version's
    ``source`` (which MLflow 3 writes as ``models:/m-...`` for logged models):
    ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` give the version's download URI,
    ``models:/m-...`` the logged model's artifact location, ``runs:/RUN[/PATH]`` itself
    (PATH defaults to the model folder)."""
    if model_uri.startswith("runs:/"):
        run_ref = model_uri.removeprefix("runs:/").strip("/")
        return model_uri if "/" in run_ref else f"runs:/{run_ref}/model"
    ref = model_uri.removeprefix("models:/")
    if "@" not in ref and "/" not in ref:  # a logged model id: models:/m-...
        return client.get_logged_model(ref).artifact_location
    mv = resolve_model_version(client, model_uri)
    return client.get_model_version_download_uri(mv.name, mv.version)


def load_model(model_uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/<logged model id>``,
    ``runs:/RUN/PATH`` or a local folder.

    Resolution goes through an explicit MlflowClient on ``tracking_uri`` (no global state).
    """
    if Path(model_uri).is_dir():
        return load_model_dir(Path(model_uri))
    if not model_uri.startswith(("models:/", "runs:/")):
        raise CxrError(f"{model_uri}: not a folder and not a models:/ or runs:/ URI")
    if not tracking_uri:
        raise CxrError(f"{model_uri}: a registry URI needs a tracking URI")
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from cxr_core.lifecycle.client import make_client

    tmp = tempfile.mkdtemp(prefix="cxr-model-")
    try:
        location = model_artifact_uri(make_client(tracking_uri), model_uri)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=tmp, tracking_uri=tracking_uri,
            registry_uri=tracking_uri)
    except MlflowException as exc:
        raise CxrError(f"{model_uri}: {exc.message}") from exc
    return load_model_dir(Path(local), source=model_uri)


def collect_paths(inputs: list[Path]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files from files and folders (recursively); junk and non-images are reported."""
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        item = Path(item)
        if item.is_file():
            found.append(str(item.resolve()))
        elif item.is_dir():
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames
                                     if d.lower() not in JUNK_DIRS and not d.startswith("."))
                for name in sorted(filenames):
                    path = Path(dirpath) / name
                    if _is_junk_name(name):
                        continue
                    if is_image_path(path):  # by extension, or DICOM by its preamble
                        found.append(str(path.resolve()))
                    else:
                        skipped.append((str(path), "not an image extension"))
        else:
            skipped.append((str(item), "no such file or folder"))
    return found, skipped


def predict_paths(loaded: LoadedModel, paths: list[str], batch_size: int = 64,
                  workers: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score image files. Returns (predictions: path, probability, label; errors: path, error).

    Each file is decoded once, by the same TensorFlow ops as in training; a file that fails
    is dropped from the batch and only then examined (full decode with Pillow) to say why.
    """
    import tensorflow as tf

    from cxr_core.data.inputs import path_dataset

    scored_paths: list[str] = []
    probs: list[np.ndarray] = []
    predict = tf.function(lambda x: loaded.model(x, training=False), reduce_retracing=True)
    for images, batch_paths in path_dataset(paths, loaded.image_size, batch_size):
        probs.append(np.asarray(predict(images), np.float64).ravel())
        scored_paths += [p.decode() for p in batch_paths.numpy()]
    prob = np.concatenate(probs) if probs else np.zeros(0)
    preds = pd.DataFrame({
        "path": scored_paths,
        "probability": prob,
        "label": [LABELS[int(p >= loaded.threshold)] for p in prob],
    })
    preds["threshold"] = loaded.threshold
    failed = sorted(set(paths) - set(scored_paths))
    errors = []
    for fact in _inspect_all(failed, workers or (os.cpu_count() or 1)):
        reason = fact["error"] or (f"format {fact['format']} cannot be decoded by the model's "
                                   "input pipeline (convert to PNG or JPEG)")
        errors.append({"path": fact["path"], "error": reason})
    return preds, pd.DataFrame(errors, columns=["path", "error"])


def write_predictions(preds: pd.DataFrame, errors: pd.DataFrame, output: Path) -> Path | None:
    """Write the predictions CSV, and ``<output>.errors.csv`` when some files were unreadable
    (returns that path, else None)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    preds.to_csv(output, index=False)
    if errors.empty:
        return None
    errors_path = output.with_name(output.stem + ".errors.csv")
    errors.to_csv(errors_path, index=False)
    return errors_path
