"""Pseudo-labels on unlabeled site images (cxr run --unlabeled DIR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_core.data.inputs import SplitData
from cxr_core.training.pseudo_label import (
    PseudoLabelPlan,
    mixed_split,
    round_dataset,
    select_pseudo_labels,
)
from support.images import make_good_dataset, write_image


def test_the_ends_of_the_ranking_are_labeled_in_proportion_to_the_predicted_prevalence() -> None:
    probs = np.linspace(0.0, 1.0, 20)  # 0, 0.053, ..., 1
    paths = [f"img{i:02d}.png" for i in range(20)]
    chosen = select_pseudo_labels(paths, probs, threshold=0.5, share=0.5)
    # 10 of 20 at or above 0.5: prevalence 0.5 -> 5 from each end, the middle left out.
    assert chosen.predicted_prevalence == 0.5
    got = dict(zip(chosen.data.paths, chosen.data.labels.tolist()))
    assert got == {**{f"img{i:02d}.png": 0 for i in range(5)},
                   **{f"img{i:02d}.png": 1 for i in range(15, 20)}}
    assert chosen.summary()["pseudo_normal"] == 5 and chosen.summary()["pseudo_pneumonia"] == 5


def test_a_site_called_mostly_pneumonia_gets_few_normal_pseudo_labels() -> None:
    # A shifted site: 80% of the images at or above the threshold. The NORMAL end shrinks
    # to share * 0.2 of the images, the lowest-scored ones.
    probs = np.r_[np.full(4, 0.1), np.full(16, 0.9)] + np.arange(20) * 1e-3
    chosen = select_pseudo_labels([str(i) for i in range(20)], probs, 0.5, share=0.5)
    labels = dict(zip(chosen.data.paths, chosen.data.labels.tolist()))
    assert [p for p, y in labels.items() if y == 0] == ["0", "1"]
    assert sorted(int(p) for p, y in labels.items() if y == 1) == list(range(12, 20))


def test_no_unlabeled_image_labels_nothing_and_lengths_must_agree() -> None:
    empty = select_pseudo_labels([], np.zeros(0), 0.5, 0.5)
    assert len(empty.data) == 0 and empty.n_images == 0
    with pytest.raises(ValueError, match="differ in length"):
        select_pseudo_labels(["a"], np.zeros(2), 0.5, 0.5)


def test_pseudo_labeled_images_make_up_the_asked_weight() -> None:
    train = SplitData([f"t{i}" for i in range(300)], np.r_[np.zeros(150), np.ones(150)].astype(np.int32))
    pseudo = SplitData(["u0", "u1", "u2", "u3", "u4"], np.array([0, 0, 1, 1, 1], np.int32))
    mixed = mixed_split(train, pseudo, weight=0.25)
    share = sum(p.startswith("u") for p in mixed.paths) / len(mixed)
    assert share == pytest.approx(0.25, abs=0.01)
    assert len(mixed.paths) == len(mixed.labels)
    # Each copy keeps its pseudo-label.
    assert {(p, int(y)) for p, y in zip(mixed.paths, mixed.labels) if p.startswith("u")} == {
        ("u0", 0), ("u1", 0), ("u2", 1), ("u3", 1), ("u4", 1)}
    assert mixed_split(train, SplitData([], np.zeros(0, np.int32)), 0.25) is train


def _drawn_labels(ds, steps: int | None) -> np.ndarray:
    batches = ds.take(steps) if steps else ds
    return np.concatenate([y.numpy() for _, y in batches])


def test_the_round_draws_classes_at_the_online_ratio_and_otherwise_keeps_the_mix(
        tmp_path: Path) -> None:
    paths = [str(write_image(tmp_path / f"img{i}.png", seed=i, size=8, fmt="PNG"))
             for i in range(20)]
    # 16 NORMAL, 4 PNEUMONIA: what an unbalanced train split plus pseudo-labels looks like.
    mixed = SplitData(paths, np.r_[np.zeros(16), np.ones(4)].astype(np.int32))

    def plan(ratio: float | None) -> PseudoLabelPlan:
        return PseudoLabelPlan([], mixed, 0.5, 0.25, 1, image_size=8, batch_size=4, seed=3,
                               rounds=1, resample_ratio=ratio)

    ds, steps = round_dataset(plan(None), mixed)
    plain = _drawn_labels(ds, steps)
    assert steps is None and len(plain) == 20 and plain.mean() == pytest.approx(0.2)
    ds, steps = round_dataset(plan(1.0), mixed)
    drawn = _drawn_labels(ds, steps)
    # An epoch covers the majority once at 1:1, so about half the draws are PNEUMONIA.
    assert steps == 8 and len(drawn) == 32
    assert 0.3 <= drawn.mean() <= 0.7


def test_the_round_goes_through_the_training_transforms_when_asked(tmp_path: Path) -> None:
    from cxr_core.config import ExperimentConfig
    from cxr_core.training.fit import pseudo_label_plan

    paths = [str(write_image(tmp_path / f"img{i}.png", seed=i, size=8, fmt="PNG"))
             for i in range(8)]
    mixed = SplitData(paths, np.r_[np.zeros(4), np.ones(4)].astype(np.int32))
    settings = {"data": {"image_size": 16}, "balance": {"augment": {"noise_std": 8.0}}}
    cfg = ExperimentConfig.model_validate(
        {**settings, "train": {"mixup_alpha": 0.4, "pseudo_label": {"augment": True}}})
    # The plan the final training builds from the config (train_best's own wiring).
    transform = pseudo_label_plan(cfg, mixed, paths).transform
    plain = ExperimentConfig.model_validate({**settings, "train": {"mixup_alpha": 0.4}})
    assert transform is not None and pseudo_label_plan(plain, mixed, paths).transform is None

    def batches(t):
        plan = PseudoLabelPlan([], mixed, 0.5, 0.25, 1, image_size=16, batch_size=8, seed=3,
                               rounds=1, transform=t)
        ds, _ = round_dataset(plan, mixed)
        return [(x.numpy(), y.numpy()) for x, y in ds]

    (x0, y0), = batches(None)
    (x1, y1), = batches(transform)
    assert set(np.unique(y0)) == {0.0, 1.0}  # plain: the hard labels
    assert not np.isin(y1, [0.0, 1.0]).all()  # mixup blends labels
    assert np.abs(x1 - x0).mean() > 0.5  # noise and blending change the pixels
    assert ((0.0 <= y1) & (y1 <= 1.0)).all()


@pytest.mark.slow
def test_final_training_with_unlabeled_images_records_its_pseudo_labels(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cxr_core.config import ExperimentConfig, deep_merge, load_config
    from cxr_core.data.balance import BalancedTrainSet
    from cxr_core.data.inputs import make_datasets
    from cxr_core.data.splits import scan_and_split
    from cxr_core.lifecycle.predict import load_model_dir
    from cxr_core.training.fit import train_best

    data = make_good_dataset(tmp_path / "data", n_patients=10, imgs=2)
    site = make_good_dataset(tmp_path / "site", n_patients=6, imgs=2, seed0=500)
    unlabeled = sorted(str(p) for p in site.rglob("*.jpeg"))
    assert unlabeled
    cfg = ExperimentConfig.model_validate(deep_merge(load_config(profile="quick").model_dump(), {
        "data": {"image_size": 32, "min_val_images": 0},
        "train": {"epochs": 1, "batch_size": 16, "pseudo_label": {"epochs": 1, "rounds": 2,
                                                                 "augment": True}},
        "balance": {"strategy": "class_weight"}}))
    scan = scan_and_split(data, cfg.data, cfg.seed)
    datasets = make_datasets(BalancedTrainSet(scan.manifest, None, None), cfg)
    hp = {"blocks": 1, "base_filters": 4, "dense_units": 8, "learning_rate": 1e-3}
    trained = train_best(hp, datasets, cfg, tmp_path / "run", unlabeled_paths=unlabeled)
    summary = trained.pseudo_labels
    assert summary is not None and summary["unlabeled_images"] == len(unlabeled)
    assert summary["pseudo_normal"] + summary["pseudo_pneumonia"] >= 1
    # Two rounds: the site images were ranked and pseudo-labeled twice.
    assert summary["rounds"] == 2
    assert len(summary["per_round"]) == 2
    assert {k: v for k, v in summary.items() if k not in ("rounds", "per_round")} == \
        summary["per_round"][-1]  # the flat counts are the last round's
    assert capsys.readouterr().out.count("[pseudo-labels]") == 2
    # The saved model and its threshold are those of the model after the extra round.
    loaded = load_model_dir(tmp_path / "run" / "model")
    assert loaded.threshold == pytest.approx(trained.threshold.threshold)
