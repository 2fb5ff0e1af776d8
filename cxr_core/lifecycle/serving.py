"""The registered model as an image-native MLflow pyfunc: encoded images in, probability,
label at the stored threshold and the threshold out.

A logged cxr model folder has two flavors: ``keras`` (the network, taking 0-255 pixel
tensors, for ``mlflow.keras.load_model``) and ``python_function``, whose loader is this
module: ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` take a DataFrame with an
``image`` column (JPEG, PNG, BMP, GIF or DICOM bytes; base64 strings in JSON) and/or a
``path`` column (files on the server), and decode them with the same TensorFlow ops as
training and ``cxr predict`` (:func:`cxr_core.data.inputs.decode_bytes`). A copy of
``cxr_core`` travels in the model's ``code/`` folder, so the serving process needs no cxr
install, only the packages in the model's requirements.
"""

from __future__ import annotations

import base64
import binascii
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_core.data.labels import LABELS

LOADER_MODULE = "cxr_core.lifecycle.serving"
CODE_DIR = "code"
INPUT_COLUMNS = ("image", "path")
OUTPUT_COLUMNS = ["probability", "label", "threshold", "error"]
# What the serving environment needs beside keras/tensorflow (virtualenv/conda env managers).
SERVING_REQUIREMENTS = ("numpy", "pandas", "pillow", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg",
                        "pylibjpeg-openjpeg", "pylibjpeg-rle", "pydantic", "pydantic-settings",
                        "pyyaml")


def image_signature() -> Any:
    """Inputs: optional ``image`` (binary) and ``path`` (string) columns; outputs: probability,
    label, threshold, error (empty when the row was scored)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False),
                       ColSpec("string", "path", required=False)]),
        outputs=Schema([ColSpec("double", "probability"), ColSpec("string", "label"),
                        ColSpec("double", "threshold"), ColSpec("string", "error")]),
    )


def add_image_pyfunc(model_dir: Path) -> None:
    """Turn a folder written by ``mlflow.keras.save_model`` into an image-native pyfunc: the
    python_function flavor loads through this module, with ``cxr_core`` copied under
    ``code/``; the keras flavor stays as it was."""
    from mlflow.models import Model
    from mlflow.pyfunc import add_to_model

    model_dir = Path(model_dir)
    mlmodel = Model.load(str(model_dir / "MLmodel"))
    env = mlmodel.flavors.pop("python_function", {}).get("env") or {}
    package = Path(__file__).resolve().parent.parent
    shutil.copytree(package, model_dir / CODE_DIR / package.name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    add_to_model(mlmodel, loader_module=LOADER_MODULE, code=CODE_DIR,
                 conda_env=env.get("conda"), python_env=env.get("virtualenv"))
    mlmodel.signature = image_signature()
    # The keras flavor's tensor input example does not fit the image signature.
    for name in ("input_example.json", "serving_input_example.json"):
        (model_dir / name).unlink(missing_ok=True)
    mlmodel.saved_input_example_info = None
    mlmodel.save(str(model_dir / "MLmodel"))


# Travel beside the network; site_threshold.json only when a calibration sample chose one.
MODEL_EXTRAS = ("threshold.json", "drift_reference.npz", "site_threshold.json")


def write_model_folder(model_dir: Path, out: Path) -> Path:
    """An MLflow model folder at ``out`` from a training output folder (``model.keras``,
    ``threshold.json``, optionally ``drift_reference.npz``): the ``mlflow.keras`` flavor,
    the image pyfunc (:func:`add_image_pyfunc`) and the extras copied beside them. Returns
    ``out``; serve it with ``mlflow models serve -m OUT`` or log it to a run."""
    import keras
    import mlflow.keras
    import tensorflow as tf

    model = keras.models.load_model(Path(model_dir) / "model.keras")
    out = Path(out)
    out.mkdir(parents=True)  # the keras flavor writes into an existing, new folder
    requirements = [f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}",
                    *SERVING_REQUIREMENTS]
    mlflow.keras.save_model(model, str(out), pip_requirements=requirements)
    add_image_pyfunc(out)
    for extra in MODEL_EXTRAS:
        src = Path(model_dir) / extra
        if src.is_file():
            shutil.copyfile(src, out / extra)
    return out


class ImageModel:
    """The pyfunc model: rows of encoded images or paths -> probability, label, threshold."""

    def __init__(self, loaded: Any) -> None:
        import tensorflow as tf

        from cxr_core.data.inputs import decode_bytes, decode_image

        self.loaded = loaded
        size = loaded.image_size
        spec = [tf.TensorSpec([], tf.string)]
        # One compiled graph per kind of input; the ops are the training pipeline's own.
        self._from_bytes = tf.function(lambda raw: decode_bytes(raw, size), input_signature=spec)
        self._from_path = tf.function(lambda p: decode_image(p, size), input_signature=spec)

    def _decode(self, image: Any, path: Any) -> np.ndarray:
        import tensorflow as tf

        try:
            if _present(image):
                return self._from_bytes(tf.constant(_as_bytes(image))).numpy()
            if _present(path):
                return self._from_path(tf.constant(str(path))).numpy()
        except tf.errors.OpError as exc:
            raise ValueError(_op_message(exc)) from None
        raise ValueError("row has neither an image nor a path")

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score each row; a row that cannot be decoded gets its ``error`` and no label."""
        frame = _as_frame(model_input)
        images, errors = [], []
        for image, path in zip(_column(frame, "image"), _column(frame, "path")):
            try:
                images.append(self._decode(image, path))
                errors.append("")
            except ValueError as exc:
                images.append(None)
                errors.append(str(exc))
        ok = [i for i, e in enumerate(errors) if not e]
        prob = np.full(len(frame), np.nan)
        if ok:
            batch = np.stack([images[i] for i in ok]).astype(np.float32)
            prob[ok] = self.loaded.predict_arrays(batch)
        t = float(self.loaded.threshold)
        labels = [None if e else LABELS[int(p >= t)] for p, e in zip(prob, errors)]
        return pd.DataFrame({"probability": prob, "label": labels, "threshold": t,
                             "error": errors}, columns=OUTPUT_COLUMNS)


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, str | bytes) and len(value) == 0)


def _as_bytes(value: Any) -> bytes:
    """Raw bytes, or a base64 string (what JSON clients send) decoded."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image is neither bytes nor a base64 string") from None


def _op_message(exc: Exception) -> str:
    """TensorFlow's error text without its graph-node prefix (``{{function_node ...}}``)."""
    import re

    text = getattr(exc, "message", str(exc)).strip()
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text).splitlines()[0]
    return f"cannot decode image: {text[:300]}"


def _as_frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, dict):
        frame = pd.DataFrame({k: list(v) if isinstance(v, list | tuple | np.ndarray) else [v]
                              for k, v in model_input.items()})
    else:
        raise ValueError("give a DataFrame (or dict) with an 'image' and/or a 'path' column")
    if not set(INPUT_COLUMNS) & set(frame.columns):
        raise ValueError(f"no 'image' or 'path' column (got {list(frame.columns)})")
    return frame


def _column(frame: pd.DataFrame, name: str) -> list[Any]:
    return frame[name].tolist() if name in frame.columns else [None] * len(frame)


def _load_pyfunc(data_path: str) -> ImageModel:
    """MLflow's loader hook: the model folder -> :class:`ImageModel`."""
    from cxr_core.lifecycle.predict import load_model_dir

    return ImageModel(load_model_dir(Path(data_path)))
