"""Experiment configuration: shipped YAML defaults, named profiles and user overrides.

Parameters (image size, split sizes, balancing, tuning budget, gate thresholds) live here;
infrastructure (where things are stored) lives in ``cxr_core.settings``.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cxr_core.errors import ConfigError


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


# External set names become folder names, metric names (external_<name>_recall) and tag
# keys: lowercase letters, digits, '_' and '-' only.
EXTERNAL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,49}$"


class ExternalSetConfig(_Section):
    """A labelled image folder from another site or device, scored after training (never
    fitted, tuned, early-stopped or thresholded on)."""

    name: str = Field(pattern=EXTERNAL_NAME_PATTERN)
    path: str = Field(min_length=1)


class DataConfig(_Section):
    image_size: int = Field(128, ge=16, le=1024)
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    min_val_images: int = Field(100, ge=0)
    scan_workers: int = Field(0, ge=0)
    # TensorFlow thread pools (0 = TensorFlow's default: all cores); set both lower when
    # several tuner workers share one machine.
    intra_op_threads: int = Field(0, ge=0)
    inter_op_threads: int = Field(0, ge=0)
    # External validation sets (cxr run --external NAME=DIR adds to or replaces by name).
    external: tuple[ExternalSetConfig, ...] = ()

    @model_validator(mode="after")
    def _unique_external_names(self) -> DataConfig:
        names = [s.name for s in self.external]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"external set name(s) given twice: {', '.join(twice)}")
        return self


class ValidationConfig(_Section):
    min_width: int = Field(64, ge=1)
    max_width: int = Field(8192, ge=1)
    min_height: int = Field(64, ge=1)
    max_height: int = Field(8192, ge=1)
    min_images_per_class: int = Field(10, ge=0)
    min_class_fraction: float = Field(0.05, ge=0, le=1)
    max_class_fraction: float = Field(0.95, ge=0, le=1)
    shortcut_auc_warn: float = Field(0.75, ge=0.5, le=1)

    @model_validator(mode="after")
    def _bounds(self) -> ValidationConfig:
        if self.min_width > self.max_width or self.min_height > self.max_height:
            raise ValueError("min image size is larger than max image size")
        if self.min_class_fraction > self.max_class_fraction:
            raise ValueError("min_class_fraction is larger than max_class_fraction")
        return self


class SynthConfig(_Section):
    n_per_class: int = Field(120, ge=2)
    size: int = Field(128, ge=32, le=1024)


class AugmentConfig(_Section):
    """Anatomically plausible transforms only: no vertical flip; horizontal flip off by
    default because it mirrors laterality markers and the heart."""

    max_rotation_deg: float = Field(10.0, ge=0, le=30)
    max_zoom: float = Field(0.10, ge=0, le=0.5)         # scale in [1 - z, 1 + z]
    max_shift: float = Field(0.05, ge=0, le=0.3)        # fraction of the side
    max_brightness: float = Field(0.10, ge=0, le=0.5)   # additive, fraction of full range
    max_contrast: float = Field(0.15, ge=0, le=0.9)     # multiplicative around the mean
    gamma_range: tuple[float, float] = (0.8, 1.25)
    horizontal_flip: bool = False
    random_gamma: bool = False   # gamma_range on every training image (input pipeline)
    max_blur_sigma: float = Field(0.0, ge=0, le=3)      # random Gaussian blur (input pipeline), pixels
    noise_std: float = Field(0.0, ge=0, le=50)          # Gaussian noise (input pipeline), grey levels
    # Shortcut mitigation (issue 12): the share of training images of both classes that get
    # a synthetic burned-in marker (a letter, "A-P", an electrode) in the top corners or
    # along the sides (input pipeline), so that text stops predicting the class.
    synthetic_marker_prob: float = Field(0.0, ge=0, le=1)


class BalanceConfig(_Section):
    strategy: Literal["offline", "online", "class_weight"] = "offline"
    target_ratio: float = Field(1.0, gt=0, le=1)        # minority : majority after balancing
    augment: AugmentConfig = AugmentConfig()


# The search space's hyperparameters (cxr_core.training.model.CxrHyperModel), the names
# ``tune.fixed`` may pin, each with the kind and range of value build_cnn accepts (wider than
# the searched range: a pinned value may lie outside it, e.g. five blocks).
SEARCH_HYPERPARAMETERS: dict[str, tuple[type, float, float]] = {
    "blocks": (int, 1, 6),            # each halves the resolution after the stride-4 stem
    "base_filters": (int, 4, 256),
    "convs_per_block": (int, 1, 4),
    "residual": (bool, 0, 1),
    "dropout": (float, 0.0, 0.9),
    "dense_units": (int, 0, 1024),    # 0: no dense layer before the output
    "learning_rate": (float, 1e-6, 1.0),
}


def _fixed_value_problem(name: str, value: bool | int | float) -> str | None:
    """Why ``value`` cannot be pinned for ``name`` (None when it can)."""
    kind, low, high = SEARCH_HYPERPARAMETERS[name]
    # bool is an int subclass in Python: check it first, both ways.
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(value, bool) or (kind is int and not isinstance(value, int)):
        return f"must be {'an integer' if kind is int else 'a number'}"
    if not low <= value <= high:
        return f"must lie in [{low}, {high}]"
    return None


class TuneConfig(_Section):
    algorithm: Literal["hyperband", "bayesian", "random"] = "hyperband"
    objective: str = "val_auc"
    max_trials: int = Field(12, ge=1)
    max_epochs: int = Field(10, ge=1)
    executions_per_trial: int = Field(1, ge=1)
    # Trials train on this class-stratified share of the train split (the final training
    # uses all of it): the search only has to rank models, at a fraction of the time.
    train_fraction: float = Field(1.0, gt=0, le=1)
    # Hyperparameters held at a value in every trial (the rest are searched), e.g.
    # {residual: true, blocks: 4, convs_per_block: 2}: an architecture measured to hold up
    # on the real shift, which validation carved from train cannot see.
    fixed: dict[str, bool | int | float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fixed_in_search_space(self) -> TuneConfig:
        unknown = sorted(set(self.fixed) - set(SEARCH_HYPERPARAMETERS))
        if unknown:
            raise ValueError(f"tune.fixed: unknown hyperparameter(s) {unknown}; the search "
                             f"space has {list(SEARCH_HYPERPARAMETERS)}")
        problems = [f"{name}: {value!r} {problem}" for name, value in self.fixed.items()
                    if (problem := _fixed_value_problem(name, value))]
        if problems:
            raise ValueError("tune.fixed: " + "; ".join(problems))
        return self


class LungCropConfig(_Section):
    """A crop inside the model that keeps the lung fields: the share of the image cut at the
    top, at the bottom (the abdomen) and on each side, then resized back. All 0: off."""

    top: float = Field(0.0, ge=0, lt=0.5)
    bottom: float = Field(0.0, ge=0, lt=0.5)
    sides: float = Field(0.0, ge=0, lt=0.3)

    @model_validator(mode="after")
    def _keeps_enough(self) -> LungCropConfig:
        if self.top + self.bottom > 0.5:
            raise ValueError("lung_crop top + bottom cut more than half the image")
        return self

    def as_tuple(self) -> tuple[float, float, float]:
        """(top, bottom, sides), the form ``build_cnn`` takes."""
        return (self.top, self.bottom, self.sides)


class PseudoLabelConfig(_Section):
    """Semi-supervised use of unlabeled images from the deployment site (``cxr run
    --unlabeled DIR``): after training, the model ranks those images; the most confident
    ``share`` of each predicted class (the top of the ranking as PNEUMONIA, the bottom as
    NORMAL, in proportion to the predicted prevalence) become pseudo-labels, and training
    goes on for ``epochs`` epochs with them making up ``weight`` of each epoch. ``rounds`` > 1
    repeats this (self-training): the model, now better at the site, ranks its images again
    and the pseudo-labels are chosen anew."""

    share: float = Field(0.5, gt=0, le=1)
    weight: float = Field(0.25, gt=0, lt=1)
    epochs: int = Field(3, ge=1)
    # Two rounds: on the full recipe, external-development ROC-AUC 0.971-0.980 against
    # 0.970-0.977 with one, paired over 4 seeds (docs/benchmarks.md, 2026-12-03).
    rounds: int = Field(2, ge=1)
    # The round's batches go through the main training's transforms as well (synthetic
    # markers, gamma/blur/noise, mixup): without it the round trains on plain images.
    augment: bool = False


class TrainConfig(_Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    early_stopping_patience: int = Field(3, ge=0)
    mixed_precision: bool = False
    # Robust-training options (issue 6): per-image intensity normalization inside the model,
    # label smoothing, and mixup of training batches (Beta(alpha, alpha); 0 = off).
    # "equalize": per-image histogram equalization (blind to any monotone grey-level change).
    intensity_norm: Literal["none", "standardize", "equalize"] = "none"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    mixup_alpha: float = Field(0.0, ge=0, le=2)
    # Platt scaling fitted on validation, folded into the output layer (cxr_core.training.calibrate).
    calibrate: bool = False
    # Test-time augmentation in the saved model: mean of the image and a 90% centre crop.
    tta: bool = False
    # Shortcut mitigations inside the model (issue 12), so training, cxr predict and the
    # saved model treat every image alike: fill the regions where burned-in annotations sit
    # (corners: top 15% rows x outer 20% columns; borders: also the outer 10% columns
    # below them) with the image's mean, and a crop that keeps the lung fields.
    mask_annotations: Literal["none", "corners", "borders"] = "none"
    # How the masked regions are filled: a flat mean, or inpainted (each masked pixel from
    # the nearby unmasked ones, a smooth continuation without the flat patch's edges).
    mask_fill: Literal["mean", "inpaint"] = "mean"
    lung_crop: LungCropConfig = LungCropConfig()
    # Weight averaging in the final training: an exponential moving average of the weights
    # (this momentum per step; 0 = off) replaces them at the end of every epoch, so
    # validation, early stopping and the saved model all see the averaged weights.
    ema_momentum: float = Field(0.0, ge=0, lt=1)
    # Final training of this many models (seeds seed, seed+1, ...) saved as one that
    # averages their logits (cxr_core.training.ensemble); the training time multiplies.
    ensemble_size: int = Field(1, ge=1, le=8)
    # Used only when a run is given unlabeled site images (--unlabeled DIR).
    pseudo_label: PseudoLabelConfig = PseudoLabelConfig()

    @model_validator(mode="after")
    def _fill_has_a_mask(self) -> TrainConfig:
        # Inpainting without a mask would be silently unused: the run would train a model
        # other than the one the config asks for.
        if self.mask_fill != "mean" and self.mask_annotations == "none":
            raise ValueError(f"train.mask_fill: {self.mask_fill} fills the annotation regions, "
                             "but train.mask_annotations is none (set corners or borders)")
        return self


class ExternalGateConfig(_Section):
    """Minimums one external set must reach at the model's threshold (each optional)."""

    min_accuracy: float | None = Field(None, ge=0, le=1)
    min_recall: float | None = Field(None, ge=0, le=1)
    min_roc_auc: float | None = Field(None, ge=0, le=1)


class GateConfig(_Section):
    min_recall: float = Field(0.95, ge=0, le=1)
    min_accuracy: float = Field(0.90, ge=0, le=1)
    use_lower_ci_bound: bool = False
    regression_alpha: float = Field(0.05, gt=0, lt=1)   # McNemar vs the champion
    min_robust_accuracy: float | None = Field(None, ge=0, le=1)  # off unless set
    recall_target_for_threshold: float = Field(0.97, ge=0, le=1)
    # External set name -> its minimums; every name must be an external set of the run.
    external: dict[str, ExternalGateConfig] = Field(default_factory=dict)


class ExperimentConfig(_Section):
    """Every parameter of one pipeline run."""

    profile: str = "default"
    seed: int = 42
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    synth: SynthConfig = SynthConfig()
    balance: BalanceConfig = BalanceConfig()
    tune: TuneConfig = TuneConfig()
    train: TrainConfig = TrainConfig()
    gates: GateConfig = GateConfig()

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``data.image_size`` -> 128), e.g. for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for key, value in obj.items():
                    walk(f"{prefix}.{key}" if prefix else key, value)
            else:
                out[prefix] = obj

        walk("", self.model_dump())
        return out


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``override``, merging nested dicts instead of replacing them."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _read_text(path: Path) -> str:
    """A user's config file as text; ConfigError when it cannot be read (permissions, not
    UTF-8 text, a folder)."""
    try:
        return path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from exc


def shipped_config_text() -> str:
    """The YAML shipped with the package (defaults and profiles)."""
    return resources.files("cxr_core.configs").joinpath("default.yaml").read_text("utf-8")


def available_profiles(config_file: Path | None = None) -> list[str]:
    """Names of the shipped profiles plus any the user file defines."""
    names = set(_read_yaml(shipped_config_text(), "shipped default.yaml").get("profiles", {}))
    if config_file is not None:
        names |= set(_read_yaml(_read_text(Path(config_file)), str(config_file)).get("profiles") or {})
    return sorted(names)


def load_config(config_file: Path | None = None, profile: str | None = None) -> ExperimentConfig:
    """Resolve the experiment config: shipped defaults < profile < user file.

    A user file may hold ``defaults:`` and ``profiles:`` like the shipped one, or plain
    top-level sections (``tune: {max_trials: 5}``), which apply over the chosen profile.
    """
    shipped = _read_yaml(shipped_config_text(), "shipped default.yaml")
    user: dict[str, Any] = {}
    source = "shipped default.yaml"
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        user = _read_yaml(_read_text(path), str(path))
        source = str(path)

    profiles = deep_merge(shipped.get("profiles") or {}, user.get("profiles") or {})
    resolved = deep_merge(shipped.get("defaults") or {}, user.get("defaults") or {})
    if profile is not None:
        if profile not in profiles:
            raise ConfigError(
                f"unknown profile {profile!r}; available: {', '.join(sorted(profiles)) or 'none'}"
            )
        resolved = deep_merge(resolved, profiles[profile] or {})
    top_level = {k: v for k, v in user.items() if k not in ("defaults", "profiles")}
    resolved = deep_merge(resolved, top_level)
    resolved["profile"] = profile or "default"
    try:
        return ExperimentConfig.model_validate(resolved)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source} (profile {profile or 'default'}): {problems}") from exc
