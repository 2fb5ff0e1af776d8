"""A run's stored inputs (data folder, profile, resolved config, manifest hash): what
`cxr run --resume RUN` reuses, and what it refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cxr_core.config import load_config
from cxr_core.errors import InputError
from flows.run_spec import (
    SPEC_FILE,
    check_data_unchanged,
    check_resume_args,
    create_run,
    load_run,
    record_data,
)
from support.images import make_good_dataset, write_image


@pytest.fixture
def user_config(tmp_path: Path) -> Path:
    f = tmp_path / "exp.yaml"
    f.write_text("tune: {max_trials: 2}\ntrain: {epochs: 3}\n")
    return f


def test_a_run_stores_its_inputs_and_a_resume_gets_them_back(tmp_path, good_dataset,
                                                             user_config) -> None:
    cfg = load_config(user_config, "quick")
    spec = create_run(tmp_path / "runs", good_dataset, "quick", cfg)
    user_config.write_text("tune: {max_trials: 9}\n")  # later edits do not leak into the run
    again = load_run(tmp_path / "runs", spec.name)
    assert again == spec and again.data_dir == good_dataset.resolve()
    assert again.config() == cfg and again.config().tune.max_trials == 2
    assert again.resume_command == f"cxr run --resume {spec.name}"
    # The same inputs given again are accepted; different ones are refused, naming both.
    check_resume_args(again, good_dataset, "quick", None)
    with pytest.raises(InputError, match="profile 'full'.*the run's: 'quick'"):
        check_resume_args(again, None, "full", None)
    with pytest.raises(InputError, match=f"data folder {tmp_path}"):
        check_resume_args(again, tmp_path, None, None)
    with pytest.raises(InputError, match="config .*exp.yaml"):
        check_resume_args(again, None, None, user_config)


@pytest.mark.parametrize("name", ["nope", "../runs", ""])
def test_unknown_run_names_the_run(tmp_path, name) -> None:
    (tmp_path / "runs").mkdir()
    with pytest.raises(InputError, match=repr(name) if name else "not a run name"):
        load_run(tmp_path / "runs", name)


def test_run_without_stored_inputs_is_refused(tmp_path) -> None:
    (tmp_path / "runs" / "old").mkdir(parents=True)
    with pytest.raises(InputError, match=SPEC_FILE):
        load_run(tmp_path / "runs", "old")
    (tmp_path / "runs" / "old" / SPEC_FILE).write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        load_run(tmp_path / "runs", "old")


def test_resume_refuses_changed_data_but_not_touched_files(tmp_path) -> None:
    from cxr_core.data.manifest import listing_fingerprint, manifest_hash
    from cxr_core.data.splits import scan_and_split

    data = make_good_dataset(tmp_path / "data", n_patients=6)
    cfg = load_config(None, "quick")
    spec = create_run(tmp_path / "runs", data, "quick", cfg)
    check_data_unchanged(spec, cfg, "anything")  # never validated: nothing to protect yet
    digest = manifest_hash(scan_and_split(data, cfg.data, cfg.seed).manifest)
    spec = record_data(spec, digest, listing_fingerprint(data))
    assert load_run(tmp_path / "runs", spec.name).manifest_hash == digest
    assert record_data(spec, "other", "other") == spec  # the first validation's identity stays
    check_data_unchanged(spec, cfg, listing_fingerprint(data))
    # New modification times, same bytes: the listing differs, the content hash does not.
    for f in data.rglob("*.jpeg"):
        os.utime(f, ns=(1, 1))
    check_data_unchanged(spec, cfg, listing_fingerprint(data))
    write_image(data / "train" / "NORMAL" / "IM-0999-0001.jpeg", 999)
    with pytest.raises(InputError, match=r"changed since the run started \(manifest hash") as exc:
        check_data_unchanged(spec, cfg, listing_fingerprint(data))
    assert f"--config {spec.config_path}" in str(exc.value)  # the new-run command reuses it
    stored = json.loads((spec.run_dir / SPEC_FILE).read_text())
    assert stored["manifest_hash"] == digest and stored["profile"] == "quick"


def test_a_run_stores_its_external_sets_and_calibration_for_the_resume(tmp_path,
                                                                       good_dataset) -> None:
    site_b, cal = tmp_path / "site-b", tmp_path / "cal"
    spec = create_run(tmp_path / "runs", good_dataset, "quick", load_config(None, "quick"),
                      external={"site-b": str(site_b)}, calibration=str(cal),
                      unlabeled=str(tmp_path / "site-images"))
    again = load_run(tmp_path / "runs", spec.name)
    assert again == spec and again.unlabeled == str(tmp_path / "site-images")
    assert again.external == {"site-b": str(site_b)} and again.calibration == str(cal)
    stored = json.loads((spec.run_dir / SPEC_FILE).read_text())
    assert stored["external"] == {"site-b": str(site_b)} and stored["calibration"] == str(cal)
    # Given again, the same sets pass; another folder, another calibration sample are refused.
    check_resume_args(again, None, None, None, {"site-b": str(site_b)}, cal)
    with pytest.raises(InputError, match=r"external set site-b=.*other \(the run's: .*site-b\)"):
        check_resume_args(again, None, None, None, {"site-b": str(tmp_path / "other")})
    with pytest.raises(InputError, match="external set site-c=.*none of that name"):
        check_resume_args(again, None, None, None, {"site-c": str(site_b)})
    with pytest.raises(InputError, match=r"calibration .*other \(the run's: .*cal\)"):
        check_resume_args(again, None, None, None, None, tmp_path / "other")
    check_resume_args(again, None, None, None, None, None, tmp_path / "site-images")
    with pytest.raises(InputError, match=r"unlabeled folder .*other \(the run's: .*site-images\)"):
        check_resume_args(again, None, None, None, None, None, tmp_path / "other")
    # A run from before external sets existed reads back with none.
    stored.pop("external"), stored.pop("calibration"), stored.pop("unlabeled")
    (spec.run_dir / SPEC_FILE).write_text(json.dumps(stored))
    old = load_run(tmp_path / "runs", spec.name)
    assert old.external == {} and old.calibration is None and old.unlabeled is None
