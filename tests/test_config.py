"""Experiment config (YAML, profiles, overrides) and infrastructure settings (CXR_ env)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_core.config import available_profiles, deep_merge, load_config
from cxr_core.errors import ConfigError
from cxr_core.settings import Settings


def test_defaults_and_profiles_resolve() -> None:
    base = load_config()
    quick = load_config(profile="quick")
    full = load_config(profile="full")
    assert base.profile == "default" and quick.profile == "quick"
    assert quick.data.image_size == 96 and full.data.image_size == 96
    assert full.tune.train_fraction == 0.5 and base.tune.train_fraction == 1.0
    assert full.train.epochs == 12
    assert base.data.image_size == 128
    assert quick.tune.max_trials < full.tune.max_trials
    # A profile overrides only what it names; the rest comes from defaults.
    assert quick.balance == base.balance
    assert {"quick", "full"} <= set(available_profiles())
    assert full.gates.min_recall == 0.95 and full.gates.min_accuracy == 0.90
    # The full profile ships the robust recipe; the defaults stay plain.
    assert full.train.calibrate and full.train.tta and full.train.intensity_norm == "standardize"
    assert not (base.train.calibrate or base.train.tta)


def test_user_file_overrides_profile_and_adds_profiles(tmp_path: Path) -> None:
    f = tmp_path / "exp.yaml"
    f.write_text("tune:\n  max_trials: 7\nprofiles:\n  tiny:\n    data:\n      image_size: 32\n")
    assert load_config(f, "quick").tune.max_trials == 7
    assert load_config(f, "tiny").data.image_size == 32
    assert "tiny" in available_profiles(f)


@pytest.mark.parametrize(
    "text, match",
    [
        ("tune:\n  max_trails: 3\n", "max_trails"),           # typo is an error, not ignored
        ("data:\n  image_size: 2\n", "image_size"),
        ("balance:\n  strategy: smote\n", "strategy"),
        ("validation:\n  min_width: 900\n  max_width: 100\n", "min image size"),
        ("- a\n- b\n", "mapping"),
        ("tune: [\n", "not valid YAML"),
        ("tune:\n  fixed:\n    residul: true\n", "residul"),  # a pinned name must exist
        # ... and a value of its kind, in the range the network builder accepts
        ("tune:\n  fixed:\n    residual: 4\n", "residual: 4 must be true or false"),
        ("tune:\n  fixed:\n    blocks: 2.5\n", "blocks: 2.5 must be an integer"),
        ("tune:\n  fixed:\n    blocks: true\n", "blocks: True must be an integer"),
        ("tune:\n  fixed:\n    dropout: 1.5\n", r"dropout: 1.5 must lie in \[0.0, 0.9\]"),
        # a fill with nothing to fill is refused, not silently unused
        ("train:\n  mask_fill: inpaint\n", "mask_annotations is none"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as exc:
        load_config(f, "quick")
    assert "bad.yaml" in str(exc.value)


def test_fixed_accepts_values_outside_the_searched_range(tmp_path: Path) -> None:
    # The search tries 3-4 blocks; a user may pin 5, and an integer dropout is a number.
    f = tmp_path / "exp.yaml"
    f.write_text("tune:\n  fixed: {blocks: 5, residual: true, dropout: 0, learning_rate: 0.01}\n")
    fixed = load_config(f, "quick").tune.fixed
    assert fixed == {"blocks": 5, "residual": True, "dropout": 0, "learning_rate": 0.01}
    assert fixed["residual"] is True


def test_unknown_profile_lists_available() -> None:
    with pytest.raises(ConfigError, match="quick"):
        load_config(profile="nope")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")


def test_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    """Bad input (exit 2 at the command line), not a crash: the file is named."""
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    for call in (lambda: load_config(binary, "quick"), lambda: available_profiles(binary)):
        with pytest.raises(ConfigError, match="binary.yaml: cannot read"):
            call()


def test_flat_view_has_dotted_keys() -> None:
    flat = load_config(profile="quick").flat()
    assert flat["data.image_size"] == 96 and flat["gates.min_recall"] == 0.80


def test_deep_merge_does_not_mutate() -> None:
    a = {"x": {"y": 1, "z": 2}}
    merged = deep_merge(a, {"x": {"y": 5}})
    assert merged == {"x": {"y": 5, "z": 2}} and a == {"x": {"y": 1, "z": 2}}


def test_settings_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CXR_S3_BUCKET", "bucket-a")
    monkeypatch.setenv("CXR_S3_SECRET_ACCESS_KEY", "very-secret-value")
    s = Settings()
    assert s.home == (tmp_path / "home").resolve()
    assert s.mlflow_tracking_uri == f"sqlite:///{(tmp_path / 'home').resolve()}/mlflow.db"
    assert s.s3_bucket == "bucket-a" and s.registered_model_name == "cxr-pneumonia"
    assert "very-secret-value" not in repr(s)
    assert not (tmp_path / "home").exists()  # building settings creates nothing
    monkeypatch.setenv("CXR_TRACKING_URI", "http://127.0.0.1:5000")
    assert Settings().mlflow_tracking_uri == "http://127.0.0.1:5000"


def test_relative_home_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CXR_HOME", raising=False)
    assert Settings().home == (tmp_path / ".cxr").resolve()
