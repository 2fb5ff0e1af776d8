"""Benchmark: training options measured on the real shift (issue 12, part 3).

Every option (a named set of config overrides, optionally with its own architecture
hyperparameters) trains a fixed architecture on the same patient-grouped train/val/test
carving of the train folder, once per seed (the seed changes initialisation, augmentation
and shuffling, never the carving), picks its threshold on validation (recall target of the
config, 0.97), and is scored at that threshold on BOTH the carved test split and an external
set acquired elsewhere (by default the external development half of the official test
split): ROC-AUC, accuracy, recall and specificity, each with a 95% bootstrap interval that
resamples patients, plus the wall time of training. Models are scored as `cxr predict`
scores them (the saved model folder: TTA, calibration and preprocessing layers included).
Nothing is chosen on the carved test split or the external set: they only report.

Option names compose: ``a+b`` merges option ``b`` over ``a``; a ``@PX`` suffix sets the
input size (``baseline@192``, ``full-profile+geo-strong@128``). ``--list`` prints them.

The carving (scan, patient-grouped split, offline balancing) is done once and cached under
``--work``; every (option, seed) row is cached there too, so an interrupted run resumes
without retraining finished rows (changing an option's settings trains it anew).

Usage: python benchmarks/external.py [DATA_DIR] [--options a,b] [--seeds 1,2]
           [--external DIR] [--epochs N] [--patience N] [--image-size PX] [--hp JSON]
           [--work DIR] [--json FILE] [--list]
       (DATA_DIR defaults to $CXR_REAL_DATA; --external to $CXR_EXTERNAL_DEV or
        ../shared/data/chest_xray_224_external_dev beside the repository)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import add_data_and_json_args, parse_with_data, write_results

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# ../shared/data beside the repository, as on the development and CI machines.
DEFAULT_EXTERNAL = str(Path(__file__).resolve().parents[2] / "shared" / "data"
                       / "chest_xray_224_external_dev")
SETS = ("test", "external")
TABLE_METRICS = ("roc_auc", "accuracy", "recall", "specificity")
# The fixed architecture: the search space's defaults (as benchmarks/robust_training.py).
# --hp replaces keys of this dict for every option; an option's own "hp" applies over both.
BASE_HP: dict[str, Any] = {"blocks": 3, "base_filters": 16, "convs_per_block": 1,
                           "residual": False, "dropout": 0.3, "dense_units": 64,
                           "learning_rate": 1e-3}
# What every option starts from: the shipped defaults at 128 px, 12 epochs at most,
# early stopping with patience 4 (as the robust-training benchmark).
BASE_OVERRIDE: dict[str, Any] = {"data": {"image_size": 128},
                                 "train": {"epochs": 12, "early_stopping_patience": 4}}
# Settings that shape the carving or the offline balancing: shared by every option.
CARVING_KEYS = ("data.val_fraction", "data.test_fraction", "data.min_val_images",
                "balance.strategy", "balance.target_ratio")


def _full_profile_recipe() -> dict[str, Any]:
    """The shipped ``full`` profile's training recipe (input size, augmentation, training
    options, the early-stopping objective), read from the shipped YAML so it follows the
    profile. Left out: its search budget (this benchmark trains fixed hyperparameters) and
    its gates (every option's threshold targets the same recall)."""
    import yaml

    from cxr_core.config import shipped_config_text

    full = dict(yaml.safe_load(shipped_config_text())["profiles"]["full"])
    full.pop("gates", None)
    full.pop("validation", None)
    full.pop("synth", None)
    tune = full.pop("tune", {}) or {}
    if "objective" in tune:
        full["tune"] = {"objective": tune["objective"]}
    return full


# name -> {"about": table text, "config": overrides of BASE_OVERRIDE, "hp": over BASE_HP}.
# Only settings that exist in cxr_core/config.py today (a misspelt key fails validation).
OPTIONS: dict[str, dict[str, Any]] = {
    "baseline": {"about": "shipped defaults, plain training", "config": {}},
    "full-profile": {"about": "the full profile's training recipe (96 px, photometric "
                              "augmentation, standardize, mixup, Platt, TTA, shift-AUC stopping)",
                     "config": _full_profile_recipe()},
    "geo-strong": {"about": "stronger geometric augmentation: zoom 0.25, rotation 15 deg, "
                            "shift 0.10",
                   "config": {"balance": {"augment": {"max_zoom": 0.25, "max_rotation_deg": 15,
                                                      "max_shift": 0.10}}}},
    "wide": {"about": "wider: 32 base filters, dense 128",
             "config": {}, "hp": {"base_filters": 32, "dense_units": 128}},
    "deep": {"about": "deeper: 4 blocks of 2 convs",
             "config": {}, "hp": {"blocks": 4, "convs_per_block": 2}},
    "residual": {"about": "residual: 4 blocks of 2 convs with shortcuts",
                 "config": {}, "hp": {"blocks": 4, "convs_per_block": 2, "residual": True}},
    "equalize": {"about": "per-image histogram equalization in the model, instead of "
                          "standardization (blind to monotone grey-level changes)",
                 "config": {"train": {"intensity_norm": "equalize"}}},
    "long": {"about": "longer training: 30 epochs at most, patience 8",
             "config": {"train": {"epochs": 30, "early_stopping_patience": 8}}},
    # Shortcut mitigations (issue 12, part 2): layers in the model, or training-only markers.
    "mask-corners": {"about": "top-corner annotations filled with the image mean, in the model",
                     "config": {"train": {"mask_annotations": "corners"}}},
    "mask-borders": {"about": "top corners and side strips filled with the image mean",
                     "config": {"train": {"mask_annotations": "borders"}}},
    "inpaint-borders": {"about": "top corners and side strips inpainted from the pixels "
                                 "around them (normalized convolution), in the model",
                        "config": {"train": {"mask_annotations": "borders",
                                             "mask_fill": "inpaint"}}},
    "lung-crop": {"about": "crop keeping the lung fields: 8% top, 20% bottom, 5% sides cut",
                  "config": {"train": {"lung_crop": {"top": 0.08, "bottom": 0.2, "sides": 0.05}}}},
    "marker-augment": {"about": "synthetic markers and text pasted onto both classes (p 0.5)",
                       "config": {"balance": {"augment": {"synthetic_marker_prob": 0.5}}}},
    "ema": {"about": "weight averaging: EMA of the weights (momentum 0.99 per step), "
                     "swapped in at every epoch end",
            "config": {"train": {"ema_momentum": 0.99}}},
    "ensemble3": {"about": "three seeds trained and saved as one model (mean logit)",
                  "config": {"train": {"ensemble_size": 3}}},
    # Semi-supervised (cxr run --unlabeled DIR), cross-fitted so that no external image is
    # scored by a model that saw it, even unlabeled: the external set is split in two by
    # patient; the model pseudo-labeled on one half scores the other, and the reverse.
    # One round, as first measured (the shipped default may differ: see pl-rounds2).
    "pseudo-label": {"about": "pseudo-labels on the unlabeled external images (share 0.5, "
                              "weight 0.25, 3 epochs, one round), cross-fitted over two "
                              "patient halves",
                     "config": {"train": {"pseudo_label": {"rounds": 1}}},
                     "unlabeled": "crossfit"},
    # Variations of the round, composed with pseudo-label (one change each).
    "pl-rounds2": {"about": "two pseudo-label rounds (relabelled by the adapted model)",
                   "config": {"train": {"pseudo_label": {"rounds": 2}}}},
    "pl-rounds3": {"about": "three pseudo-label rounds (each relabelled by the last round's model)",
                   "config": {"train": {"pseudo_label": {"rounds": 3}}}},
    "pl-share80": {"about": "pseudo-labels on 80% of each predicted class (not 50%)",
                   "config": {"train": {"pseudo_label": {"share": 0.8}}}},
    "pl-weight50": {"about": "pseudo-labelled images half of each round's epoch (not 25%)",
                    "config": {"train": {"pseudo_label": {"weight": 0.5}}}},
    "pl-augment": {"about": "the round's batches through the training transforms (markers, "
                             "gamma/blur/noise, mixup), not plain",
                   "config": {"train": {"pseudo_label": {"augment": True}}}},
}
# What runs without --options: each option at its own size, plus input resolution.
DEFAULT_OPTIONS = ("baseline", "full-profile", "baseline@96", "baseline@192", "baseline@224",
                   "geo-strong", "wide", "deep", "residual", "long", "mask-corners",
                   "mask-borders", "lung-crop", "marker-augment")


def resolve_option(name: str) -> dict[str, Any]:
    """``a+b@PX`` -> {"config": merged overrides, "hp": merged hp, "about": text}."""
    from cxr_core.config import deep_merge

    body, _, size = name.partition("@")
    config: dict[str, Any] = {}
    hp: dict[str, Any] = {}
    about = []
    unlabeled = None
    for part in body.split("+"):
        if part not in OPTIONS:
            raise SystemExit(f"unknown option {part!r} in {name!r}; known: {', '.join(OPTIONS)}")
        config = deep_merge(config, OPTIONS[part]["config"])
        hp.update(OPTIONS[part].get("hp", {}))
        about.append(OPTIONS[part]["about"])
        unlabeled = OPTIONS[part].get("unlabeled", unlabeled)
    if size:
        if not size.isdigit():
            raise SystemExit(f"{name!r}: the @ suffix is an input size in pixels, e.g. @192")
        config = deep_merge(config, {"data": {"image_size": int(size)}})
        about.append(f"{size} px")
    return {"config": config, "hp": hp, "about": "; ".join(about), "unlabeled": unlabeled}


# Settings added to the config after rows were first cached, with the value they had in
# effect before: left out of a row's cache key at that value, so that adding a setting (or
# changing its default later) does not retrain every cached row.
# A path names a nested setting; nested ones come first, so that their section then
# compares like before.
KEY_OMITS_AT = {("train", "pseudo_label", "augment"): False,
                ("train", "ema_momentum"): 0.0,
                ("train", "pseudo_label"): {"share": 0.5, "weight": 0.25, "epochs": 3,
                                            "rounds": 1},
                ("train", "ensemble_size"): 1,
                ("train", "mask_fill"): "mean",
                ("tune", "fixed"): {}}


def _key_config(cfg: Any, unlabeled: str | None = None) -> dict[str, Any]:
    """``cfg`` as a dict for the cache key (see :data:`KEY_OMITS_AT`). Without unlabeled
    images (``unlabeled`` None) the pseudo-label settings do nothing and are left out."""
    dumped = cfg.model_dump()
    for (*parents, key), value in KEY_OMITS_AT.items():
        section = dumped
        for name in parents:
            section = section.get(name) or {}
        if section.get(key) == value:
            section.pop(key, None)
    if unlabeled is None:
        dumped["train"].pop("pseudo_label", None)
    return dumped


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    """Write atomically: an interrupted run never leaves a half-written cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _carving(data_dir: Path, base: Any, work: Path) -> tuple[Path, dict[str, Any]]:
    """The prepared (carved + balanced) manifest, made once per (data folder contents,
    carving settings) and cached under ``work``."""
    from cxr_core.data.manifest import listing_fingerprint, write_manifest
    from cxr_core.data.splits import scan_and_split
    from cxr_core.stages import balance_stage

    flat = base.flat()
    key = {"data_dir": str(Path(data_dir).resolve()), "seed": base.seed,
           "listing": listing_fingerprint(data_dir),
           **{k: flat[k] for k in CARVING_KEYS},
           "augment": base.balance.augment.model_dump()}
    carving_id = _digest(key)[:12]
    folder = work / f"carving-{carving_id}"
    info_path = folder / "carving.json"
    info = _read_json(info_path)
    if info is not None and (folder / "prepared_manifest.parquet").is_file():
        print(f"[external] carving {carving_id}: cached in {folder}", flush=True)
        return folder / "prepared_manifest.parquet", info
    t0 = time.perf_counter()
    scan = scan_and_split(Path(data_dir), base.data, base.seed)
    manifest_path = write_manifest(scan.manifest, folder / "manifest.parquet")
    prepared = balance_stage(manifest_path, base, folder)
    info = {"id": carving_id, **key, "seconds": round(time.perf_counter() - t0, 1)}
    _write_json(info_path, info)
    print(f"[external] carving {carving_id}: scanned, split and balanced in "
          f"{info['seconds']} s ({folder})", flush=True)
    return prepared, info


def _external_rows(external: Path, work: Path) -> Any:
    """Readable, labelled images of the external folder (any layout the scanner accepts:
    a test/ split or NORMAL/ and PNEUMONIA/ directly), scanned once and cached."""
    import pandas as pd

    from cxr_core.data.labels import LABELS
    from cxr_core.data.manifest import listing_fingerprint, read_manifest, scan_dataset, write_manifest

    fingerprint = listing_fingerprint(external)
    cached = work / f"external-{fingerprint[:12]}.parquet"
    if cached.is_file():
        rows = read_manifest(cached)
    else:
        rows = scan_dataset(external).manifest
        write_manifest(rows, cached)
    bad = rows[~rows["readable"].astype(bool)]
    for r in bad.itertuples():
        print(f"[external] unreadable, left out: {r.path}: {r.error}", flush=True)
    rows = rows[rows["readable"].astype(bool) & rows["label"].isin(LABELS)]
    if rows.empty or rows["label"].nunique() < 2:
        raise SystemExit(f"{external}: the external set needs labelled NORMAL and PNEUMONIA "
                         "images")
    return pd.DataFrame(rows).sort_values("path").reset_index(drop=True), fingerprint


def _overlap(manifest: Any, external: Any) -> dict[str, int]:
    """External images identical to, or sharing an inferred patient id with, the images
    that train or select models (train and val splits)."""
    fit = manifest[manifest["split"].isin(["train", "val"]) & manifest["readable"].astype(bool)]
    return {"identical_files": int(external["sha256"].isin(set(fit["sha256"])).sum()),
            "shared_patient_ids": int(external["patient_id"].isin(set(fit["patient_id"])).sum())}


def _predict(loaded: Any, rows: Any) -> Any:
    """Per-image probabilities as ``cxr predict`` computes them (``loaded``: the saved model
    folder through ``load_model_dir``), joined to the rows' label and patient id; files the
    model's pipeline cannot decode are reported and left out."""
    from cxr_core.data.labels import POSITIVE
    from cxr_core.lifecycle.predict import predict_paths

    preds, errors = predict_paths(loaded, rows["path"].tolist())
    for e in errors.itertuples():
        print(f"[external] not scored: {e.path}: {e.error}", flush=True)
    out = rows[["path", "patient_id", "label"]].merge(preds[["path", "probability"]], on="path")
    out["label"] = (out["label"] == POSITIVE).astype(int)
    return out


def _score(preds: Any, threshold: float, n_bootstrap: int, recall_target: float) -> dict:
    """Metrics at ``threshold`` with patient-bootstrap intervals, plus (a diagnostic of the
    ranking, never used to choose anything) the accuracy the best threshold chosen on these
    very labels would reach at the recall target."""
    from cxr_core.evaluation.metrics import evaluate_predictions, point_metrics
    from cxr_core.training.fit import choose_threshold

    y = preds["label"].to_numpy()
    p = preds["probability"].to_numpy()
    ev = evaluate_predictions(y, p, threshold, n_bootstrap=n_bootstrap, seed=0,
                              groups=preds["patient_id"].to_numpy(object))
    out = ev.to_dict()
    oracle = choose_threshold(y, p, recall_target)
    out["ceiling_accuracy_at_recall_target"] = round(
        point_metrics(y, p, oracle.threshold)["accuracy"], 4)
    return out


def _train_row(name: str, seed: int, cfg: Any, hp: dict[str, Any], prepared: Path,
               folder: Path, unlabeled: list[str] | None = None) -> dict[str, Any]:
    """Train one (option, seed) (or reuse the finished training cached in ``folder``)."""
    cached = _read_json(folder / "trained.json")
    if cached is not None and (folder / "model" / "model.keras").is_file():
        print(f"[external] {name} seed {seed}: trained model cached", flush=True)
        return cached
    from cxr_core.data.balance import BalancedTrainSet, class_weight_for
    from cxr_core.data.inputs import make_datasets
    from cxr_core.data.manifest import read_manifest
    from cxr_core.training.fit import train_best

    manifest = read_manifest(prepared)
    datasets = make_datasets(BalancedTrainSet(manifest, None, class_weight_for(manifest, cfg)),
                             cfg)
    print(f"[external] {name} seed {seed}: training ({cfg.data.image_size} px, "
          f"{cfg.train.epochs} epochs at most, {len(datasets.train_data)} train images)",
          flush=True)
    t0 = time.perf_counter()
    trained = train_best(hp, datasets, cfg, folder, unlabeled_paths=unlabeled)
    seconds = time.perf_counter() - t0
    hist = trained.history
    images_seen = len(datasets.train_data) * trained.epochs_trained
    record = {
        "train_seconds": round(seconds, 1),
        "train_images": len(datasets.train_data), "val_images": len(datasets.val_data),
        "epochs": trained.epochs_trained, "best_epoch": trained.best_epoch,
        "train_images_per_second": round(images_seen / seconds, 1) if seconds else None,
        "threshold": trained.threshold.threshold,
        "val_recall": trained.threshold.recall, "val_specificity": trained.threshold.specificity,
        "val_auc": max(hist.get("val_auc", [math.nan])),
        "calibration": trained.calibration,
        "pseudo_labels": trained.pseudo_labels,
    }
    _write_json(folder / "trained.json", record)
    return record


def _score_sets(loaded: Any, folder: Path, val_rows: Any, test_rows: Any, ext_rows: Any,
                n_bootstrap: int, target: float) -> dict[str, Any]:
    """Predictions of one saved model on val, test and external (CSV files in ``folder``),
    and the test and external scores at its own threshold."""
    scores: dict[str, Any] = {}
    for set_name, rows in (("val", val_rows), ("test", test_rows), ("external", ext_rows)):
        preds = _predict(loaded, rows)
        preds.to_csv(folder / f"{set_name}_predictions.csv", index=False)
        if set_name != "val":  # validation outputs are kept only for the seed ensemble
            scores[set_name] = _score(preds, loaded.threshold, n_bootstrap, target)
    return scores


def patient_halves(rows: Any) -> list[Any]:
    """Two halves of ``rows`` by patient, stratified by label (fixed seed)."""
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    folds = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=0)
    return [rows.iloc[idx].reset_index(drop=True) for _, idx in
            folds.split(np.zeros(len(rows)), rows["label"], rows["patient_id"].astype(str))]


def _aligned(preds: Any, threshold: float) -> Any:
    """Probabilities moved on the logit scale so that ``threshold`` lands on 0.5: decisions
    and the ranking within ``preds`` are unchanged, and two models' outputs can be pooled
    and scored at one threshold."""
    import numpy as np

    eps = 1e-7
    p = np.clip(preds["probability"].to_numpy(np.float64), eps, 1 - eps)
    t = min(max(threshold, eps), 1 - eps)
    shifted = np.log(p / (1 - p)) - math.log(t / (1 - t))
    return preds.assign(probability=1.0 / (1.0 + np.exp(-shifted)))


def _crossfit_row(name: str, seed: int, cfg: Any, hp: dict[str, Any], prepared: Path,
                  folder: Path, val_rows: Any, test_rows: Any, ext_rows: Any,
                  n_bootstrap: int, target: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two trainings, each given one patient half of the external set as unlabeled images
    and scoring the other half; the external score pools the two (each model's output
    aligned to its own threshold). Val and test are scored by the first model."""
    import pandas as pd

    from cxr_core.lifecycle.predict import load_model_dir

    halves = patient_halves(ext_rows)
    trained_folds, external = [], []
    for k, half in enumerate(halves):
        fold = folder / f"fold{k}"
        trained_folds.append(_train_row(f"{name} fold {k}", seed, cfg, hp, prepared, fold,
                                        unlabeled=half["path"].tolist()))
        other = halves[1 - k]
        loaded = load_model_dir(fold / "model")
        external.append(_aligned(_predict(loaded, other), loaded.threshold))
    scores = _score_sets(load_model_dir(folder / "fold0" / "model"), folder, val_rows,
                         test_rows, ext_rows, n_bootstrap, target)
    pooled = pd.concat(external, ignore_index=True).sort_values("path")
    pooled.to_csv(folder / "external_predictions.csv", index=False)
    scores["external"] = _score(pooled, 0.5, n_bootstrap, target)
    trained = dict(trained_folds[0])
    trained["train_seconds"] = round(sum(t["train_seconds"] for t in trained_folds), 1)
    trained["folds"] = trained_folds
    return trained, scores


def _row(name: str, seed: int, args: argparse.Namespace, base: Any, prepared: Path,
         carving: dict, val_rows: Any, test_rows: Any, ext_rows: Any, ext_fingerprint: str,
         work: Path) -> dict[str, Any]:
    """One (option, seed): trained (or cached), scored on the carved test and the external
    set (or the cached scores, when nothing they depend on changed)."""
    from cxr_core.config import ExperimentConfig, deep_merge
    from cxr_core.lifecycle.predict import load_model_dir

    option = resolve_option(name)
    override = deep_merge(BASE_OVERRIDE, option["config"])
    # --image-size sets every option's size except where the name itself says (@PX).
    size = None if "@" in name else args.image_size
    cli = {"data": {"image_size": size}, "train": {
        "epochs": args.epochs, "early_stopping_patience": args.patience}}
    cli = {s: {k: v for k, v in d.items() if v is not None} for s, d in cli.items()}
    override = deep_merge(override, {**cli, "seed": seed})
    cfg = ExperimentConfig.model_validate(deep_merge(base.model_dump(), override))
    flat, base_flat = cfg.flat(), base.flat()
    changed = [k for k in CARVING_KEYS if flat[k] != base_flat[k]]
    if changed:
        raise SystemExit(f"option {name!r} changes the shared carving ({', '.join(changed)}): "
                         "every option must train on the same carving")
    hp = {**BASE_HP, **json.loads(args.hp or "{}"), **option["hp"]}
    train_key = _digest({"cfg": _key_config(cfg, option["unlabeled"]), "hp": hp,
                         "carving": carving["id"]})[:10]
    folder = work / "rows" / name / f"seed{seed}-{train_key}"
    _write_json(folder / "settings.json", {"option": name, "seed": seed, "hp": hp,
                                           "config": cfg.model_dump(), "carving": carving["id"]})
    score_key = {"external": ext_fingerprint, "n_bootstrap": args.n_bootstrap}
    cached = _read_json(folder / "row.json")
    if cached is not None and cached.get("score_key") == score_key:
        print(f"[external] {name} seed {seed}: cached row ({folder})", flush=True)
        if not (folder / "val_predictions.csv").is_file():
            _predict(load_model_dir(folder / "model"), val_rows).to_csv(
                folder / "val_predictions.csv", index=False)
        return cached

    target = cfg.gates.recall_target_for_threshold
    if option["unlabeled"] == "crossfit":
        trained, scores = _crossfit_row(name, seed, cfg, hp, prepared, folder, val_rows,
                                        test_rows, ext_rows, args.n_bootstrap, target)
        t0 = time.perf_counter()
    else:
        trained = _train_row(name, seed, cfg, hp, prepared, folder)
        t0 = time.perf_counter()
        scores = _score_sets(load_model_dir(folder / "model"), folder, val_rows, test_rows,
                             ext_rows, args.n_bootstrap, target)
    row = {
        "option": name, "seed": seed, "about": option["about"],
        "unlabeled": option["unlabeled"],
        "image_size": cfg.data.image_size, "hp": hp, "overrides": override,
        "recall_target": target, **trained,
        "score_seconds": round(time.perf_counter() - t0, 1),
        **scores, "folder": str(folder), "score_key": score_key,
    }
    _write_json(folder / "row.json", row)
    return row


def patient_quarters(rows: Any) -> list[Any]:
    """Each of :func:`patient_halves` split in two again by patient, stratified by label
    (fixed seed): [half 0 part 0, half 0 part 1, half 1 part 0, half 1 part 1]."""
    return [q for half in patient_halves(rows) for q in patient_halves(half)]


def calibration_pairs(ext_rows: Any, small: bool) -> list[tuple[set, set]]:
    """(calibration paths, scored paths) pairs that cover the external set once.

    ``small=False``: the two patient halves, each choosing the threshold for the other
    (about half the set labelled). ``small=True``: within each half, its two quarters choose
    for each other, so a cross-fitted pseudo-label model (which saw the other half,
    unlabeled) never saw the calibration sample nor the images it scores."""
    parts = patient_quarters(ext_rows) if small else patient_halves(ext_rows)
    paths = [set(p["path"]) for p in parts]
    pairs = [(0, 1), (1, 0), (2, 3), (3, 2)] if small else [(0, 1), (1, 0)]
    return [(paths[a], paths[b]) for a, b in pairs]


def site_calibrated(rows: list[dict], ext_rows: Any, n_bootstrap: int,
                    small: bool = False) -> list[dict]:
    """What ``cxr run --calibration`` would give each row on the external set, cross-fitted
    over :func:`calibration_pairs`: the threshold chosen for the recall target on one part,
    with its labels, scores the other; the scored parts are pooled (each aligned to its own
    threshold). No training: the row's saved external outputs. Cross-fitted pseudo-label
    rows only with ``small`` (with halves, the calibration half is the one they saw)."""
    import pandas as pd

    from cxr_core.training.fit import choose_threshold

    pairs = calibration_pairs(ext_rows, small)
    out = []
    for r in rows:
        if r.get("unlabeled") and not small:
            continue
        preds = pd.read_csv(Path(r["folder"]) / "external_predictions.csv",
                            dtype={"patient_id": str})
        parts, thresholds = [], []
        for cal_paths, scored_paths in pairs:
            chosen = preds[preds["path"].isin(cal_paths)]
            t = choose_threshold(chosen["label"].to_numpy(), chosen["probability"].to_numpy(),
                                 r["recall_target"]).threshold
            thresholds.append(t)
            parts.append(_aligned(preds[preds["path"].isin(scored_paths)], t))
        pooled = pd.concat(parts, ignore_index=True)
        out.append({"option": r["option"], "seed": r["seed"], "site_thresholds": thresholds,
                    "calibration_images": round(sum(len(c) for c, _ in pairs) / len(pairs)),
                    "model_threshold": r["threshold"],
                    "external": _score(pooled, 0.5, n_bootstrap, r["recall_target"])})
    return out


def seed_ensembles(rows: list[dict], n_bootstrap: int) -> list[dict]:
    """Per option with two seeds or more: the mean of its seeds' probabilities as one model
    (no extra training), thresholded on the mean validation output for the same recall
    target and scored like a row. What saving the seeds as one ensemble model would give."""
    import pandas as pd

    from cxr_core.training.fit import choose_threshold

    by_option: dict[str, list[dict]] = {}
    for r in rows:
        by_option.setdefault(r["option"], []).append(r)
    out = []
    for name, group in by_option.items():
        # Cross-fitted rows pool two models' aligned outputs: no one validation output to
        # threshold a mean of them on.
        if len(group) < 2 or any(r.get("unlabeled") for r in group):
            continue

        def mean_probs(set_name: str, group=group) -> pd.DataFrame:
            frames = [pd.read_csv(Path(r["folder"]) / f"{set_name}_predictions.csv",
                                  dtype={"patient_id": str}) for r in group]
            merged = frames[0][["path", "patient_id", "label"]]
            for i, f in enumerate(frames):  # inner join: images every seed scored
                merged = merged.merge(f[["path", "probability"]].rename(
                    columns={"probability": f"p{i}"}), on="path")
            merged["probability"] = merged[[f"p{i}" for i in range(len(frames))]].mean(axis=1)
            return merged

        target = group[0]["recall_target"]
        val = mean_probs("val")
        threshold = choose_threshold(val["label"].to_numpy(), val["probability"].to_numpy(),
                                     target).threshold
        out.append({"option": f"{name} (ensemble of {len(group)} seeds)", "base_option": name,
                    "seeds": [r["seed"] for r in group], "image_size": group[0]["image_size"],
                    "threshold": threshold, "recall_target": target,
                    **{s: _score(mean_probs(s), threshold, n_bootstrap, target) for s in SETS}})
    return out


# ------------------------------------------------------------------------- reporting


def _value(row: dict, set_name: str, metric: str) -> float | None:
    return row[set_name]["metrics"][metric]["value"]


def summarize(rows: list[dict]) -> list[dict]:
    """Per option: mean, min and max over seeds of every table metric on both sets, and of
    the training wall time."""
    by_option: dict[str, list[dict]] = {}
    for r in rows:
        by_option.setdefault(r["option"], []).append(r)
    out = []
    for name, group in by_option.items():
        summary: dict[str, Any] = {"option": name, "about": group[0]["about"],
                                   "image_size": group[0]["image_size"],
                                   "seeds": [r["seed"] for r in group]}
        for set_name in SETS:
            for metric in (*TABLE_METRICS, "ceiling_accuracy_at_recall_target"):
                if metric in TABLE_METRICS:
                    vals = [_value(r, set_name, metric) for r in group]
                else:
                    vals = [r[set_name][metric] for r in group]
                vals = [v for v in vals if v is not None]
                summary[f"{set_name}_{metric}"] = (
                    {"mean": round(sum(vals) / len(vals), 4), "min": round(min(vals), 4),
                     "max": round(max(vals), 4)} if vals else None)
        secs = [r["train_seconds"] for r in group]
        summary["train_seconds"] = {"mean": round(sum(secs) / len(secs), 1),
                                    "min": min(secs), "max": max(secs)}
        out.append(summary)
    return out


def _spread(s: dict | None, digits: int = 3) -> str:
    if s is None:
        return "-"
    if s["min"] == s["max"]:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _interval(m: dict) -> str:
    if m["value"] is None:
        return "-"
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def markdown(rows: list[dict], summary: list[dict], ensembles: list[dict], command: str,
             n_test: int, n_ext: int, site: list[dict] | None = None,
             site_small: list[dict] | None = None) -> str:
    """The two tables of docs/benchmarks.md: per option over seeds, then every row (and
    every option's seed ensemble) with its patient-bootstrap intervals."""
    heads = ("ROC-AUC", "accuracy", "recall", "specificity")
    lines = [f"Command: `{command}`", "",
             f"Per option: mean (min-max) over seeds. Carved test split ({n_test} images) and "
             f"external development set ({n_ext} images), at the validation-chosen threshold.",
             "",
             "| option | px | seeds | " + " | ".join(f"test {h}" for h in heads) + " | "
             + " | ".join(f"external {h}" for h in heads) + " | train s |",
             "| --- | --- | --- | " + " | ".join(["---"] * 8) + " | --- |"]
    for s in summary:
        cells = [_spread(s[f"{set_name}_{m}"]) for set_name in SETS for m in TABLE_METRICS]
        lines.append(f"| {s['option']} | {s['image_size']} | {len(s['seeds'])} | "
                     + " | ".join(cells) + f" | {_spread(s['train_seconds'], 0)} |")
    lines += ["", "Every row, with 95% bootstrap intervals (patients resampled):", "",
              "| option | seed | " + " | ".join(f"test {h}" for h in heads) + " | "
              + " | ".join(f"external {h}" for h in heads) + " | epochs | train s |",
              "| --- | --- | " + " | ".join(["---"] * 8) + " | --- | --- |"]
    for r in rows:
        cells = [_interval(r[set_name]["metrics"][m]) for set_name in SETS
                 for m in TABLE_METRICS]
        lines.append(f"| {r['option']} | {r['seed']} | " + " | ".join(cells)
                     + f" | {r['epochs']} | {r['train_seconds']:.0f} |")
    for e in ensembles:
        cells = [_interval(e[set_name]["metrics"][m]) for set_name in SETS
                 for m in TABLE_METRICS]
        lines.append(f"| {e['option']} | {','.join(map(str, e['seeds']))} | "
                     + " | ".join(cells) + " | - | - |")
    captions = (
        (site, "Site calibration (`--calibration`), cross-fitted: the threshold chosen on one "
               "patient half of the external set scores the other half, and the reverse "
               "(pooled):"),
        (site_small, "Site calibration with a smaller sample, nested in the cross-fitting: "
                     "each patient half is split in two again, and each quarter chooses the "
                     "threshold for the other (pooled); a pseudo-label row's model saw neither "
                     "quarter:"))
    for table, caption in captions:
        if not table:
            continue
        lines += ["", caption, "",
                  "| option | seed | labelled | model threshold | site thresholds | "
                  + " | ".join(f"external {h}" for h in heads) + " |",
                  "| --- | --- | --- | --- | --- | " + " | ".join(["---"] * 4) + " |"]
        for c in table:
            cells = [_interval(c["external"]["metrics"][m]) for m in TABLE_METRICS]
            lines.append(f"| {c['option']} | {c['seed']} | {c['calibration_images']} | "
                         f"{c['model_threshold']:.3f} | "
                         + ", ".join(f"{t:.3f}" for t in c["site_thresholds"]) + " | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_and_json_args(parser, "external")
    parser.add_argument("--external", type=Path,
                        default=Path(os.environ.get("CXR_EXTERNAL_DEV") or DEFAULT_EXTERNAL),
                        help="labelled external set (default: $CXR_EXTERNAL_DEV or "
                             f"{DEFAULT_EXTERNAL}); only scored, never fitted or selected on")
    parser.add_argument("--options", default=",".join(DEFAULT_OPTIONS),
                        help="comma-separated option names (a+b composes, @PX sets the size)")
    parser.add_argument("--seeds", default="1,2", help="comma-separated training seeds")
    parser.add_argument("--epochs", type=int, default=None, help="default: each option's")
    parser.add_argument("--patience", type=int, default=None, help="default: each option's")
    parser.add_argument("--image-size", type=int, default=None,
                        help="default: each option's (a name's @PX wins over this)")
    parser.add_argument("--hp", default=None,
                        help=f"JSON over the base hyperparameters {json.dumps(BASE_HP)}")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cxr-external-bench"))
    parser.add_argument("--list", action="store_true", help="print the options and exit")
    if argv is None:
        argv = sys.argv[1:]
    if "--list" in argv:
        for name, opt in OPTIONS.items():
            print(f"{name:14s} {opt['about']}"
                  + (f"; hp {json.dumps(opt['hp'])}" if opt.get("hp") else ""))
        print(f"default set: {','.join(DEFAULT_OPTIONS)}")
        return 0
    args = parse_with_data(parser, argv)
    names = [n.strip() for n in args.options.split(",") if n.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for n in names:
        resolve_option(n)  # unknown names fail before any work
    unknown = set(json.loads(args.hp or "{}")) - {*BASE_HP, "separable"}
    if unknown:
        parser.error(f"--hp: unknown hyperparameter(s) {sorted(unknown)}; known: "
                     f"{sorted({*BASE_HP, 'separable'})}")
    if len(seeds) < 2:
        print("[external] warning: one seed per option shows no seed-to-seed spread",
              flush=True)
    if not args.external.is_dir():
        parser.error(f"{args.external}: no such external folder (give --external DIR)")

    from cxr_core.config import ExperimentConfig, deep_merge, load_config
    from cxr_core.data.inputs import configure_tensorflow, split_rows
    from cxr_core.data.manifest import read_manifest
    from cxr_core.evaluation.scoring import test_split

    base = ExperimentConfig.model_validate(deep_merge(load_config().model_dump(),
                                                      BASE_OVERRIDE))
    configure_tensorflow(base.data.intra_op_threads, base.data.inter_op_threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    prepared, carving = _carving(Path(args.data_dir), base, work)
    test_rows = test_split(prepared)
    val_rows = split_rows(read_manifest(prepared), "val")
    ext_rows, ext_fingerprint = _external_rows(args.external, work)
    overlap = _overlap(read_manifest(prepared), ext_rows)
    print(f"[external] carved test {len(test_rows)} images; external {len(ext_rows)} images "
          f"({args.external}); external vs train/val: {overlap}", flush=True)
    command = "python " + " ".join(["benchmarks/external.py", *argv])

    import keras

    def save(rows: list[dict], ensembles: list[dict], complete: bool,
             site: list[dict] | None = None, site_small: list[dict] | None = None) -> None:
        write_results(args.json, "external", {
            "complete": complete, "data_dir": args.data_dir, "external": str(args.external),
            "carving": carving, "test_images": int(len(test_rows)),
            "external_images": int(len(ext_rows)), "external_overlap": overlap,
            "base_hyperparameters": BASE_HP, "base_override": BASE_OVERRIDE,
            "options": names, "seeds": seeds, "rows": rows, "summary": summarize(rows),
            "seed_ensembles": ensembles, "site_calibrated": site or [],
            "site_calibrated_small": site_small or []}, argv)

    rows: list[dict] = []
    for name in names:
        for seed in seeds:
            row = _row(name, seed, args, base, prepared, carving, val_rows, test_rows,
                       ext_rows, ext_fingerprint, work)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("option", "seed", "train_seconds", "epochs")}
                             | {f"{s}_{m}": _value(row, s, m) for s in SETS
                                for m in TABLE_METRICS}), flush=True)
            keras.backend.clear_session()
            save(rows, [], complete=False)  # an interrupted run still leaves its figures

    ensembles = seed_ensembles(rows, args.n_bootstrap)
    site = site_calibrated(rows, ext_rows, args.n_bootstrap)
    site_small = site_calibrated(rows, ext_rows, args.n_bootstrap, small=True)
    save(rows, ensembles, complete=True, site=site, site_small=site_small)
    print()
    print(markdown(rows, summarize(rows), ensembles, command, len(test_rows), len(ext_rows),
                   site, site_small))
    return 0


if __name__ == "__main__":
    sys.exit(main())
