"""tf.data input pipeline from the manifest: decode -> gray -> resize -> cache -> shuffle ->
batch -> prefetch. Images stay raw 0-255 (the model rescales), so a saved model takes files'
pixels as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cxr_core.config import ExperimentConfig
from cxr_core.data.labels import AUGMENTED_ORIGIN, LABELS, POSITIVE
from cxr_core.errors import DataValidationError

# Formats TensorFlow decodes natively; others (TIFF) are refused before training starts.
TF_DECODABLE = frozenset({"JPEG", "PNG", "BMP", "GIF", "DICOM"})  # DICOM via pydicom


@dataclass(frozen=True)
class SplitData:
    """Paths and 0/1 labels (1 = PNEUMONIA) of one split."""

    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, fraction: float, seed: int) -> SplitData:
        """A class-stratified random ``fraction`` of the rows (seeded), in the same order."""
        if fraction >= 1.0:
            return self
        rng = np.random.default_rng(seed)
        keep = np.zeros(len(self.paths), dtype=bool)
        for label in (0, 1):
            idx = np.flatnonzero(self.labels == label)
            n = max(1, round(fraction * len(idx))) if len(idx) else 0
            keep[rng.choice(idx, size=n, replace=False)] = True
        return SplitData([p for p, k in zip(self.paths, keep) if k], self.labels[keep])

    def class_counts(self) -> dict[str, int]:
        n_pos = int(self.labels.sum())
        return {LABELS[0]: len(self.labels) - n_pos, LABELS[1]: n_pos}


def configure_tensorflow(intra_op_threads: int = 0, inter_op_threads: int = 0,
                         gpu_memory_growth: bool = True) -> None:
    """Thread pools and GPU memory growth; must run before the first TensorFlow op.

    Memory growth lets several tuner workers share one GPU instead of each grabbing it all.
    Calling it again after TensorFlow has started is a no-op rather than an error.
    """
    import tensorflow as tf

    try:
        if intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        if inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
        if gpu_memory_growth:
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        pass  # TensorFlow already initialised in this process: keep its settings


def split_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    """Readable, labelled manifest rows of one split, in an order that does not depend on
    where the files lie: augmented variants first, then the data folder's images, each by
    its path relative to its own folder.

    The order is what a seeded shuffle permutes, so it decides the batches and the model.
    It used to be the absolute path's, which put the variants (under the run's state
    folder) before or after the source images (under the data folder) depending on how the
    two folders' names sorted: the same seed and data trained different models from
    ``/tmp/a`` and ``/work/x``. Variants first is what that order gave whenever the state
    folder's path sorted before the data folder's, as in the documented benchmarks."""
    rows = manifest[(manifest["split"] == split) & manifest["readable"].astype(bool)
                    & manifest["label"].isin(LABELS)]
    paths = rows["path"].astype(str)
    # A partial manifest (no origin or relative path: e.g. a drift reference's) sorts by path.
    origin = rows["split_origin"] if "split_origin" in rows else pd.Series("", index=rows.index)
    relpath = rows["relpath"].fillna(paths) if "relpath" in rows else paths
    key = pd.DataFrame({
        "source_first": (origin != AUGMENTED_ORIGIN).to_numpy(),
        "relpath": relpath.astype(str).to_numpy(),
        "path": paths.to_numpy(),  # a tie-break only: relpaths are unique
    })
    order = key.sort_values(["source_first", "relpath", "path"], kind="stable").index
    return rows.iloc[order.to_numpy()].reset_index(drop=True)


def split_data(manifest: pd.DataFrame, split: str) -> SplitData:
    """Paths and labels of :func:`split_rows`; refuses formats TensorFlow cannot decode."""
    rows = split_rows(manifest, split)
    bad = rows[~rows["format"].isin(TF_DECODABLE)]
    if len(bad):
        raise DataValidationError(
            f"{len(bad)} image(s) in a format the training pipeline cannot decode "
            f"({', '.join(sorted(set(bad['format'].astype(str))))}), e.g. {bad['path'].iloc[0]}; "
            "convert them to PNG or JPEG")
    return SplitData(rows["path"].tolist(), (rows["label"] == POSITIVE).to_numpy(np.int32))


def decode_image(path, image_size: int):
    """File path tensor -> uint8 tensor [size, size, 1] (any channel count, 8 or 16 bit;
    DICOM by extension or preamble)."""
    import tensorflow as tf

    from cxr_core.data.dicom import DICOM_EXTENSIONS

    pattern = r".*\.(" + "|".join(sorted(e.lstrip(".") for e in DICOM_EXTENSIONS)) + ")"
    named_dicom = tf.strings.regex_full_match(tf.strings.lower(path), pattern)
    return decode_bytes(tf.io.read_file(path), image_size, dicom_hint=named_dicom, name=path)


def decode_bytes(raw, image_size: int, dicom_hint=False, name="<bytes>"):
    """Encoded image bytes (JPEG, PNG, BMP, GIF or DICOM) -> uint8 tensor [size, size, 1]:
    the one decode path of training, evaluation, ``cxr predict`` and the serving model."""
    import tensorflow as tf

    head = tf.strings.substr(raw, 0, 132) + b" " * 132  # substr truncates; pad to test byte 128
    is_dicom = tf.logical_or(dicom_hint, tf.equal(tf.strings.substr(head, 128, 4), b"DICM"))
    img = tf.cond(is_dicom, lambda: _decode_dicom(raw, name), lambda: _decode_native(raw))
    img = tf.image.resize(img, [image_size, image_size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)


def _decode_native(raw):
    import tensorflow as tf

    # dtype=uint8 rescales 16-bit PNGs instead of truncating them.
    img = tf.io.decode_image(raw, channels=0, dtype=tf.uint8, expand_animations=False)
    channels = tf.shape(img)[-1]
    return tf.cond(
        channels >= 3,
        lambda: tf.image.rgb_to_grayscale(img[..., :3]),
        lambda: img[..., :1],  # L, or LA: drop alpha
    )


def _decode_dicom(raw, name):
    """DICOM through pydicom (tf.py_function): TensorFlow has no DICOM decoder. The cost is
    Python-side decoding under the GIL, once per file per run (the dataset caches decoded
    images); a file that fails raises, as a corrupt JPEG does."""
    import tensorflow as tf

    from cxr_core.data.dicom import decode_gray

    def decode(data, label):
        return decode_gray(data.numpy(), label.numpy().decode("utf-8", "replace"))[..., None]

    img = tf.py_function(decode, [raw, name], Tout=tf.uint8)
    img.set_shape([None, None, 1])
    return img


def pin_global_seed(seed: int) -> None:
    """Set TensorFlow's global seed to ``seed`` before a seeded shuffle or draw is built.

    tf.data takes the global seed, as it stands when the dataset is created, as half of an
    op's seed: the same ``seed=`` shuffled differently after a training in the same process
    had set the global seed (a benchmark training several models in one process could not
    reproduce a row). Pinning it makes the order depend on ``seed`` alone. Side effect: the
    global seed stays set (the trainings set it again before they build a model)."""
    import tensorflow as tf

    tf.random.set_seed(seed)


def make_dataset(data: SplitData, image_size: int, batch_size: int, shuffle: bool, seed: int,
                 cache: bool | str = True, parallel_calls: int | None = None):
    """Batched ``(float32 images 0-255 [B,S,S,1], float32 labels [B])`` dataset.

    Decoding happens once (cached as uint8); shuffling after the cache reshuffles every epoch
    with a fixed seed, so a run is repeatable. ``cache`` may be a file path prefix for data
    that does not fit in memory.
    """
    import tensorflow as tf

    autotune = parallel_calls or tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices((data.paths, data.labels.astype(np.float32)))
    ds = ds.map(lambda p, y: (decode_image(p, image_size), y), num_parallel_calls=autotune,
                deterministic=True)
    if cache:
        ds = ds.cache(cache if isinstance(cache, str) else "")
    if shuffle:
        pin_global_seed(seed)
        ds = ds.shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune,
                deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_resampled_dataset(data: SplitData, image_size: int, batch_size: int, seed: int,
                           target_ratio: float = 1.0, parallel_calls: int | None = None):
    """The ``online`` balancing strategy: draw classes at ``target_ratio`` (minority:majority)
    by resampling the minority with replacement. Augmentation happens in the model's own
    random layers, so each repeat of a minority image is a different variant.

    Returns ``(dataset, steps_per_epoch)``; an epoch covers the majority class once.
    """
    import tensorflow as tf

    autotune = parallel_calls or tf.data.AUTOTUNE
    pin_global_seed(seed)
    per_class = []
    for cls in (0, 1):
        idx = np.flatnonzero(data.labels == cls)
        if len(idx) == 0:
            raise ValueError(f"class {LABELS[cls]} has no training images to resample")
        sub = SplitData([data.paths[i] for i in idx], data.labels[idx])
        ds = tf.data.Dataset.from_tensor_slices((sub.paths, sub.labels.astype(np.float32)))
        ds = ds.map(lambda p, y: (decode_image(p, image_size), y), num_parallel_calls=autotune,
                    deterministic=True).cache()
        per_class.append(ds.shuffle(len(sub), seed=seed + cls).repeat())
    counts = np.bincount(data.labels, minlength=2)
    major = int(np.argmax(counts))
    weights = [target_ratio, target_ratio]
    weights[major] = 1.0
    total = float(sum(weights))
    mixed = tf.data.Dataset.sample_from_datasets(
        per_class, weights=[w / total for w in weights], seed=seed)
    epoch_images = int(counts[major] * (1 + target_ratio))
    steps = max(1, int(np.ceil(epoch_images / batch_size)))
    ds = mixed.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y),
                                     num_parallel_calls=autotune, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE), steps


def load_images(paths: Sequence[str], image_size: int) -> np.ndarray:
    """Decode files exactly as training does, as a float32 array [N, S, S, 1] (for prediction
    and evaluation of small sets)."""
    data = SplitData(list(paths), np.zeros(len(paths), np.int32))
    batches = [x.numpy() for x, _ in make_dataset(data, image_size, 256, shuffle=False, seed=0,
                                                 cache=False)]
    return np.concatenate(batches) if batches else np.zeros((0, image_size, image_size, 1),
                                                            np.float32)


def _batch_seeds(seed: int, streams: int):
    """A dataset yielding, for batch i of the e-th pass over it, ``streams`` stateless-RNG
    seeds ``[seed, e * 2**32 + streams * i + k]``.

    Keras starts a new pass over a finite dataset every epoch, and a plain
    ``Dataset.counter()`` restarts with it: every epoch would draw the same noise, gamma,
    blur and mixup weights at each batch position. The pass number comes from a counter
    variable that each new pass increments, so epoch e of a run draws what epoch e of any
    run with this seed draws, and no two epochs draw alike; an endless (resampled) stream
    is one pass whose batch index keeps growing. Nothing depends on TensorFlow's global seed
    (``tf.data.Dataset.random`` does, and so changed with whatever else had run in the
    process)."""
    import tensorflow as tf

    with tf.device("/CPU:0"):  # tf.data runs on the CPU: keep the counter beside it
        passes = tf.Variable(-1, dtype=tf.int64, trainable=False, name="augment_passes")
    k = tf.range(streams, dtype=tf.int64)
    first = tf.fill([streams], tf.constant(seed, tf.int64))

    def one_pass(_):
        epoch = passes.assign_add(1)
        return tf.data.Dataset.counter().map(
            lambda i: tf.stack([first, epoch * 2**32 + streams * i + k], axis=1))

    # flat_map hides that the stream is endless; saying so keeps the zipped training data's
    # length known (Keras warns and shows no progress total for an unknown one).
    endless = tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)
    return tf.data.Dataset.range(1).flat_map(one_pass).apply(endless)


def mixup(dataset, alpha: float, seed: int):
    """Mixup of a batched ``(images, labels)`` dataset: each image and label is blended with
    another of the same batch with a weight drawn from Beta(alpha, alpha). A regularizer that
    keeps predictions from getting overconfident. Every epoch draws new weights and
    partners; a run is deterministic for a seed, whatever TensorFlow's global seed
    (:func:`_batch_seeds`)."""
    import tensorflow as tf

    if alpha <= 0:
        return dataset
    seeds = _batch_seeds(seed, 2)

    def blend(batch, pair):
        x, y = batch
        n = tf.shape(x)[0]
        s1, s2 = pair[0], pair[1]
        g1 = tf.random.stateless_gamma([n], s1, alpha=alpha)
        g2 = tf.random.stateless_gamma([n], s2, alpha=alpha)
        lam = g1 / (g1 + g2)
        partner = tf.random.experimental.stateless_shuffle(tf.range(n), s1)
        lam_x = tf.reshape(lam, [-1, 1, 1, 1])
        x = lam_x * x + (1.0 - lam_x) * tf.gather(x, partner)
        y = lam * y + (1.0 - lam) * tf.gather(y, partner)
        return x, y

    return tf.data.Dataset.zip((dataset, seeds)).map(blend, num_parallel_calls=tf.data.AUTOTUNE,
                                                      deterministic=True)


def gaussian_blur(x, sigma, radius: int = 2):
    """Blur each image of a ``[n, h, w, 1]`` batch with its own Gaussian ``sigma[i]``
    (pixels; kernel ``2 * radius + 1`` wide, separable, borders reflected).

    The batch is moved onto the channel axis so one depthwise convolution applies n
    different kernels at once (measured: 0.5 s for 170 batches of 32 at 96 px on 2 cores,
    against about 20 s for the training epoch it feeds)."""
    import tensorflow as tf

    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(t[None, :] / tf.reshape(sigma, [-1, 1])))  # [n, taps]
    k = tf.transpose(k / tf.reduce_sum(k, axis=1, keepdims=True))  # [taps, n]
    y = tf.transpose(x, [3, 1, 2, 0])  # [1, h, w, n]
    y = tf.pad(y, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    y = tf.nn.depthwise_conv2d(y, k[:, None, :, None], [1, 1, 1, 1], "VALID")
    y = tf.nn.depthwise_conv2d(y, k[None, :, :, None], [1, 1, 1, 1], "VALID")
    return tf.transpose(y, [3, 1, 2, 0])


def photometric(dataset, gamma_range: tuple[float, float] | None, noise_std: float, seed: int,
                max_blur_sigma: float = 0.0):
    """Train-time acquisition changes on a batched ``(images 0-255, labels)`` dataset: a
    random gamma in ``gamma_range`` (log-uniform) per image, a Gaussian blur with a sigma
    drawn per image from 0.05 to ``max_blur_sigma`` pixels, then Gaussian noise with a
    standard deviation drawn per image from 0 to ``noise_std`` grey levels. Exposure
    curves, detector sharpness and noise differ between scanners and none of them is undone
    by a linear normalization. Lives in the input pipeline because Keras has no gamma layer,
    its GaussianNoise takes no stddev above 1 and its RandomGaussianBlur draws one sigma per
    batch. Every epoch draws new values; a run is deterministic for a seed, whatever
    TensorFlow's global seed (:func:`_batch_seeds`)."""
    import tensorflow as tf

    lo, hi = (float(g) for g in (gamma_range or (1.0, 1.0)))
    if lo == hi == 1.0 and not noise_std and not max_blur_sigma:
        return dataset
    seeds = _batch_seeds(seed + 17, 4)

    def apply(batch, s):
        x, y = batch
        n = tf.shape(x)[0]
        if (lo, hi) != (1.0, 1.0):
            u = tf.random.stateless_uniform([n, 1, 1, 1], s[0], minval=np.log(lo), maxval=np.log(hi))
            x = 255.0 * tf.pow(x / 255.0, tf.exp(u))
        if max_blur_sigma:
            sigma = tf.random.stateless_uniform([n], s[1], minval=0.05, maxval=max_blur_sigma)
            x = gaussian_blur(x, sigma)
        if noise_std:
            sigma = noise_std * tf.random.stateless_uniform([n, 1, 1, 1], s[2])
            x = x + sigma * tf.random.stateless_normal(tf.shape(x), s[3])
        return tf.clip_by_value(x, 0.0, 255.0), y

    return tf.data.Dataset.zip((dataset, seeds)).map(apply, num_parallel_calls=tf.data.AUTOTUNE,
                                                      deterministic=True)


def paste_markers(dataset, prob: float, image_size: int, seed: int):
    """Synthetic burned-in markers on a batched training ``(images 0-255, labels)`` dataset:
    each image, whatever its label, gets with probability ``prob`` one stamp of
    :func:`cxr_core.data.markers.marker_stamps` (a letter, "A-P", an electrode) at a random
    place in a top corner or along a side, at a grey level from 150 to 255, kept where the
    image is brighter (burned-in text is the brightest thing there). A model can then no
    longer tell the class by the text. Training data only; a run is deterministic for a seed
    (:func:`_batch_seeds`)."""
    import tensorflow as tf

    from cxr_core.data.markers import marker_stamps, zone_offsets

    if prob <= 0:
        return dataset
    stamps = tf.constant(marker_stamps(image_size))
    zones = tf.constant(zone_offsets(image_size))
    k, h, w = stamps.shape
    seeds = _batch_seeds(seed + 29, 1)

    def place(args):
        stamp, row, col = args
        return tf.pad(stamp, [[row, image_size - h - row], [col, image_size - w - col]])

    def apply(batch, s):
        x, y = batch
        n = tf.shape(x)[0]
        u = tf.random.stateless_uniform([n, 6], s[0])
        which = tf.minimum(tf.cast(u[:, 1] * k, tf.int32), k - 1)
        zone = tf.gather(zones, tf.minimum(tf.cast(u[:, 2] * len(zones), tf.int32), len(zones) - 1))
        row = zone[:, 0] + tf.cast(u[:, 3] * tf.cast(zone[:, 1] - zone[:, 0] + 1, tf.float32), tf.int32)
        col = zone[:, 2] + tf.cast(u[:, 4] * tf.cast(zone[:, 3] - zone[:, 2] + 1, tf.float32), tf.int32)
        row, col = tf.minimum(row, zone[:, 1]), tf.minimum(col, zone[:, 3])
        canvas = tf.map_fn(place, (tf.gather(stamps, which), row, col),
                           fn_output_signature=tf.float32)
        level = (150.0 + 105.0 * u[:, 5]) * tf.cast(u[:, 0] < prob, tf.float32)
        marker = canvas[..., None] * tf.reshape(level, [-1, 1, 1, 1])
        return tf.maximum(x, marker), y

    return tf.data.Dataset.zip((dataset, seeds)).map(apply, num_parallel_calls=tf.data.AUTOTUNE,
                                                      deterministic=True)


@dataclass
class Datasets:
    """tf.data datasets of one run, with what fit() needs beside them."""

    train: Any
    val: Any
    train_data: SplitData
    val_data: SplitData
    steps_per_epoch: int | None
    class_weight: dict[int, float] | None


def make_datasets(balanced: Any, cfg: ExperimentConfig,
                  train_fraction: float = 1.0) -> Datasets:
    """Train (shuffled; resampled for ``online``) and validation (fixed order) datasets.

    ``train_fraction`` < 1 trains on a class-stratified, seeded sample of the train split
    (the search's ``tune.train_fraction``); validation is always whole."""
    size, batch = cfg.data.image_size, cfg.train.batch_size
    train_data = split_data(balanced.manifest, "train").sample(train_fraction, cfg.seed)
    val_data = split_data(balanced.manifest, "val")
    if not len(val_data):
        raise DataValidationError("the validation split is empty: nothing to select models on")
    steps = None
    if cfg.balance.strategy == "online":
        train, steps = make_resampled_dataset(train_data, size, batch, cfg.seed,
                                              cfg.balance.target_ratio)
    else:
        train = make_dataset(train_data, size, batch, shuffle=True, seed=cfg.seed)
    train = augment_training_batches(train, cfg, cfg.seed)
    val = make_dataset(val_data, size, batch, shuffle=False, seed=cfg.seed)
    return Datasets(train, val, train_data, val_data, steps, balanced.class_weight)


def augment_training_batches(dataset: Any, cfg: ExperimentConfig, seed: int) -> Any:
    """``cfg``'s train-only transforms of a batched ``(images 0-255, labels)`` dataset:
    synthetic markers, acquisition changes (gamma, blur, noise), then mixup. The geometric
    augmentation lives in the model (``build_cnn``) and needs nothing here."""
    size, aug = cfg.data.image_size, cfg.balance.augment
    # Markers first: burned-in text goes through the same exposure, blur and noise.
    dataset = paste_markers(dataset, aug.synthetic_marker_prob, size, seed)
    if aug.random_gamma or aug.noise_std or aug.max_blur_sigma:
        dataset = photometric(dataset, aug.gamma_range if aug.random_gamma else None,
                              aug.noise_std, seed, max_blur_sigma=aug.max_blur_sigma)
    if cfg.train.mixup_alpha:
        dataset = mixup(dataset, cfg.train.mixup_alpha, seed)
    return dataset


def path_dataset(paths: list[str], image_size: int, batch_size: int) -> Any:
    """(images, paths) batches; files TensorFlow cannot decode are dropped, not fatal."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(paths)
    ds = ds.map(lambda p: (tf.cast(decode_image(p, image_size), tf.float32), p),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # A bad file raises inside the map; ignore_errors drops that element and goes on.
    ds = ds.ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
