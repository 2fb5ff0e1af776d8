"""Input pipeline, model family and operating threshold (fast: no search)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_core.data.inputs import SplitData, load_images, make_dataset, make_resampled_dataset, split_data
from cxr_core.data.manifest import scan_dataset
from cxr_core.errors import DataValidationError
from support.images import write_image


def _first_epoch_labels(ds) -> list[float]:
    return [float(v) for _, y in ds for v in y.numpy()]


def test_dataset_shapes_dtypes_and_raw_pixel_range(good_dataset: Path) -> None:
    m = scan_dataset(good_dataset, workers=1).manifest
    data = split_data(m, "train")
    assert len(data) == 32 and data.class_counts() == {"NORMAL": 16, "PNEUMONIA": 16}
    ds = make_dataset(data, 32, 8, shuffle=True, seed=1)
    x, y = next(iter(ds))
    assert x.shape == (8, 32, 32, 1) and x.dtype.name == "float32"
    assert float(x.numpy().max()) > 1.5  # raw 0-255 pixels: the model rescales
    assert set(y.numpy().tolist()) <= {0.0, 1.0}


def test_shuffle_is_deterministic_for_a_seed_and_reshuffles_each_epoch(good_dataset: Path) -> None:
    data = split_data(scan_dataset(good_dataset, workers=1).manifest, "train")
    a = make_dataset(data, 16, 4, shuffle=True, seed=7)
    b = make_dataset(data, 16, 4, shuffle=True, seed=7)
    first_a, second_a = _first_epoch_labels(a), _first_epoch_labels(a)
    assert first_a == _first_epoch_labels(b)
    xa = np.concatenate([x.numpy() for x, _ in make_dataset(data, 16, 4, True, 7)])
    xb = np.concatenate([x.numpy() for x, _ in make_dataset(data, 16, 4, True, 7)])
    assert np.array_equal(xa, xb)
    xc = np.concatenate([x.numpy() for x, _ in make_dataset(data, 16, 4, True, 8)])
    assert not np.array_equal(xa, xc)
    assert sorted(first_a) == sorted(second_a)


def test_the_order_depends_on_the_seed_alone_not_on_what_ran_before(tmp_path: Path) -> None:
    """A training sets TensorFlow's global seed, which tf.data mixes into an op's seed: a
    later dataset with the same ``seed`` must still draw the same order."""
    import tensorflow as tf

    paths = [str(write_image(tmp_path / f"{i}.png", i, size=8, fmt="PNG")) for i in range(24)]
    data = SplitData(paths, np.array([1] * 16 + [0] * 8, np.int32))

    def orders() -> tuple[list[float], list[float]]:
        plain = [float(x.numpy().mean()) for x, _ in make_dataset(data, 8, 4, True, seed=5)]
        drawn, _ = make_resampled_dataset(data, 8, 4, seed=5)
        return plain, [float(x.numpy().mean()) for x, _ in drawn.take(6)]

    tf.random.set_seed(1)  # as a training seeded 1 leaves it
    first = orders()
    tf.random.set_seed(2)
    assert orders() == first


def test_decodes_rgba_16bit_and_png_named_jpeg(tmp_path: Path) -> None:
    paths = [
        write_image(tmp_path / "a.png", 1, size=40, mode="RGBA", fmt="PNG"),
        write_image(tmp_path / "b.png", 2, size=40, mode="I;16", fmt="PNG"),
        write_image(tmp_path / "c.jpeg", 3, size=40, fmt="PNG"),
        write_image(tmp_path / "d.jpeg", 4, size=50, mode="RGB"),
    ]
    x = load_images([str(p) for p in paths], 24)
    assert x.shape == (4, 24, 24, 1)
    # 16-bit is rescaled to 8 bits (not truncated to its low byte, not all zero).
    assert 50 < x[1].mean() < 200


def test_formats_tf_cannot_decode_are_refused_by_name(tmp_path: Path) -> None:
    tif = write_image(tmp_path / "train" / "NORMAL" / "IM-0001-0001.tif", 1, fmt="TIFF")
    write_image(tmp_path / "train" / "PNEUMONIA" / "person1_virus_1.jpeg", 2)
    m = scan_dataset(tmp_path, workers=1).manifest
    with pytest.raises(DataValidationError, match="TIFF") as exc:
        split_data(m, "train")
    assert str(tif.resolve()) in str(exc.value)


def test_online_resampling_balances_classes(tmp_path: Path) -> None:
    paths, labels = [], []
    for i in range(24):
        label = 1 if i < 18 else 0  # 3:1 imbalance
        paths.append(str(write_image(tmp_path / f"{i}.png", i, size=16, fmt="PNG")))
        labels.append(label)
    data = SplitData(paths, np.array(labels, np.int32))
    ds, steps = make_resampled_dataset(data, 16, 8, seed=0, target_ratio=1.0)
    assert steps == int(np.ceil(18 * 2 / 8))
    ys = [float(v) for _, y in ds.take(40) for v in y.numpy()]
    assert 0.4 < np.mean(ys) < 0.6


def test_thread_settings_apply_before_the_first_op() -> None:
    import subprocess
    import sys

    code = ("from cxr_core.data.inputs import configure_tensorflow; configure_tensorflow(1, 2);"
            "import tensorflow as tf; c = tf.config.threading;"
            "print(c.get_intra_op_parallelism_threads(), c.get_inter_op_parallelism_threads());"
            "configure_tensorflow(2, 2)")  # a second call after start-up must not raise
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "2"]


def test_mixup_blends_images_and_labels_alike_and_repeats() -> None:
    import tensorflow as tf

    from cxr_core.data.inputs import mixup

    # Image value encodes the label (0 -> 0, 1 -> 255): after mixup label == value / 255.
    y = np.array([0, 1] * 8, np.float32)
    x = np.repeat(y[:, None, None, None] * 255.0, 4, axis=1).repeat(4, axis=2)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    (mx, my), = list(mixup(ds, 0.4, seed=5))
    assert np.allclose(mx.numpy()[:, 0, 0, 0] / 255.0, my.numpy(), atol=1e-5)
    assert ((my.numpy() > 0.01) & (my.numpy() < 0.99)).any()  # something was blended
    tf.random.set_seed(999)  # other code reseeding TensorFlow changes nothing here
    (_, again), = list(mixup(ds, 0.4, seed=5))
    assert np.array_equal(my.numpy(), again.numpy())
    assert mixup(ds, 0.0, seed=5) is ds


def test_photometric_augmentation_changes_images_reproducibly() -> None:
    import tensorflow as tf

    from cxr_core.data.inputs import photometric

    x = np.full((8, 16, 16, 1), 128.0, np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(8, np.float32))).batch(8)
    (out, _), = list(photometric(ds, (0.6, 1.6), 8.0, seed=1))
    out = out.numpy()
    assert out.min() >= 0 and out.max() <= 255
    assert out.mean(axis=(1, 2, 3)).std() > 5       # a different gamma per image
    assert out.std(axis=(1, 2, 3)).max() > 1        # noise
    tf.random.set_seed(999)  # other code reseeding TensorFlow changes nothing here
    (again, _), = list(photometric(ds, (0.6, 1.6), 8.0, seed=1))
    assert np.array_equal(out, again.numpy())
    assert photometric(ds, None, 0.0, seed=1) is ds


def test_gaussian_blur_matches_scipy_per_image_sigma() -> None:
    import tensorflow as tf
    from scipy.ndimage import gaussian_filter

    from cxr_core.data.inputs import gaussian_blur

    x = np.random.default_rng(0).uniform(0, 255, (3, 20, 20, 1)).astype(np.float32)
    sigma = np.array([0.3, 1.0, 2.0], np.float32)
    out = gaussian_blur(tf.constant(x), tf.constant(sigma)).numpy()
    for i, s in enumerate(sigma):  # radius 2, reflected borders = scipy's "mirror"
        ref = gaussian_filter(x[i, :, :, 0], float(s), mode="mirror", truncate=2 / float(s))
        assert np.abs(out[i, :, :, 0] - ref).max() < 1e-3


def test_photometric_blur_softens_edges_reproducibly() -> None:
    import tensorflow as tf

    from cxr_core.data.inputs import photometric

    x = np.zeros((4, 16, 16, 1), np.float32)
    x[:, :, 8:] = 255.0  # a sharp vertical edge
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(4, np.float32))).batch(4)
    (out, _), = list(photometric(ds, None, 0.0, seed=3, max_blur_sigma=1.5))
    out = out.numpy()
    # The edge is spread (a sigma drawn near 0.05 leaves one image almost sharp) ...
    spread = (out[:, :, 7].mean(axis=(1, 2)) > 1) & (out[:, :, 8].mean(axis=(1, 2)) < 254)
    assert spread.sum() >= 2
    assert len({round(float(v), 3) for v in out[:, 0, 7, 0]}) == 4  # ... by a sigma per image
    tf.random.set_seed(12345)  # other code reseeding TensorFlow changes nothing here
    (again, _), = list(photometric(ds, None, 0.0, seed=3, max_blur_sigma=1.5))
    assert np.array_equal(out, again.numpy())


def test_split_sample_is_stratified_seeded_and_ordered() -> None:
    from cxr_core.data.inputs import SplitData

    data = SplitData([f"img{i:03d}.jpeg" for i in range(100)],
                     np.array([0] * 30 + [1] * 70, np.int32))
    half = data.sample(0.5, seed=7)
    assert half.class_counts() == {"NORMAL": 15, "PNEUMONIA": 35}
    assert half.paths == sorted(half.paths)
    assert half.paths == data.sample(0.5, seed=7).paths
    assert half.paths != data.sample(0.5, seed=8).paths
    assert data.sample(1.0, seed=7) is data


def _batches_seen_by_fit(dataset, epochs: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """What Keras' own training loop feeds the model: per epoch, each batch's (x, y)."""
    import keras
    import tensorflow as tf

    seen: list[tuple[np.ndarray, np.ndarray]] = []

    class Recorder(keras.Model):
        def call(self, x):
            return x

        def train_step(self, data):
            x, y = data
            seen.append((np.array(x), np.array(y)))
            return {"mean": tf.reduce_mean(x)}

    model = Recorder()
    model.compile(run_eagerly=True)
    model.fit(dataset, epochs=epochs, verbose=0, shuffle=False)
    per_epoch = len(seen) // epochs
    return [seen[e * per_epoch:(e + 1) * per_epoch] for e in range(epochs)]


def test_augmentation_draws_anew_every_epoch_and_repeats_across_runs() -> None:
    import tensorflow as tf

    from cxr_core.data.inputs import mixup, photometric

    y = np.array([0, 1] * 8, np.float32)
    x = np.repeat(y[:, None, None, None] * 100.0 + 60.0, 8, axis=1).repeat(8, axis=2)

    def augmented():
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        return mixup(photometric(ds, (0.6, 1.6), 8.0, seed=1, max_blur_sigma=1.0), 0.4, seed=1)

    first = _batches_seen_by_fit(augmented(), epochs=2)
    tf.random.set_seed(999)  # other code reseeding TensorFlow changes nothing
    second = _batches_seen_by_fit(augmented(), epochs=2)
    assert len(first[0]) == 2  # two batches per epoch
    for (xa, ya), (xb, yb) in zip(first[0] + first[1], second[0] + second[1]):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)  # one seed, one run
    for (x0, y0), (x1, y1) in zip(first[0], first[1]):
        assert not np.allclose(x0, x1)  # gamma, blur, noise drawn anew ...
        assert not np.allclose(y0, y1)  # ... and the mixup weights
