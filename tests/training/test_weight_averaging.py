"""Weight averaging (train.ema_momentum) in the final training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_core.data.inputs import SplitData, make_dataset
from cxr_core.training.fit import _ema_options, train_final
from support.images import write_image


def _tiny(root: Path, n: int = 24) -> SplitData:
    paths = [str(write_image(root / f"{i}.png", 300 + i, size=32, fmt="PNG")) for i in range(n)]
    return SplitData(paths, np.arange(n, dtype=np.int32) % 2)


def test_the_average_replaces_the_weights_at_each_epochs_last_step(tmp_path) -> None:
    data = _tiny(tmp_path)
    ds = make_dataset(data, 32, batch_size=8, shuffle=True, seed=0)
    assert _ema_options(0.0, ds, None) == {}
    assert _ema_options(0.9, ds, None) == {"use_ema": True, "ema_momentum": 0.9,
                                           "ema_overwrite_frequency": 3}  # 24 images / 8
    assert _ema_options(0.9, ds, 5)["ema_overwrite_frequency"] == 5  # resampled epochs


def test_final_training_with_weight_averaging_trains_with_the_averaging_optimizer(tmp_path) -> None:
    import keras

    data = _tiny(tmp_path / "img")
    train = make_dataset(data, 32, batch_size=8, shuffle=True, seed=0)
    val = make_dataset(data, 32, batch_size=8, shuffle=False, seed=0)
    hp = {"blocks": 1, "base_filters": 4, "dense_units": 8, "learning_rate": 1e-2}
    trained = train_final(hp, train, val, data.labels, tmp_path / "m", image_size=32, epochs=2,
                          patience=0, recall_target=0.9, ema_momentum=0.5)
    model = keras.saving.load_model(trained.model_path)
    opt = model.optimizer
    # The option reached the optimizer the model was trained and saved with: averaging on,
    # the average swapped in at each epoch's last step (24 images / batch 8 = 3 steps).
    # (Keras itself swaps the average in; comparing weights with averages after fit()
    # would only restate that.)
    assert opt.use_ema and opt.ema_momentum == 0.5 and opt.ema_overwrite_frequency == 3
