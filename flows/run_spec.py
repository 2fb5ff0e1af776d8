"""What a retrain run was started with, kept in its work directory: the data folder, the
profile, the resolved config, the external sets and site-calibration sample, and once the
data is validated its manifest hash. A resume
(`cxr run --resume RUN`) reuses them, so the one-word command continues exactly that run,
and it refuses when the data changed since."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cxr_core.config import ExperimentConfig, load_config
from cxr_core.errors import InputError

SPEC_FILE = "run.json"
CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class RunSpec:
    """A run's inputs. ``manifest_hash`` (content of the data set) and ``data_fingerprint``
    (its file listing) are recorded after the first successful validation. ``external``:
    external set name -> absolute folder (the config's list merged with --external);
    ``calibration``: the site-calibration sample's folder, if any; ``unlabeled``: the
    folder of unlabeled site images for pseudo-labels, if any."""

    run_dir: Path
    data_dir: Path
    profile: str
    manifest_hash: str | None = None
    data_fingerprint: str | None = None
    external: dict[str, str] = field(default_factory=dict)
    calibration: str | None = None
    unlabeled: str | None = None

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def config_path(self) -> Path:
        """The resolved config the run started with (every key, not only overrides)."""
        return self.run_dir / CONFIG_FILE

    @property
    def resume_command(self) -> str:
        """The command that continues this run (nothing else needs repeating)."""
        return f"cxr run --resume {self.name}"

    def config(self) -> ExperimentConfig:
        return load_config(self.config_path, self.profile)


def default_profile(data_dir: object | None) -> str:
    """'quick' for the synthetic demo (no data folder), 'full' for a real data set."""
    return "full" if data_dir else "quick"


def create_run(runs_dir: Path, data_dir: Path, profile: str, cfg: ExperimentConfig,
               external: dict[str, str] | None = None, calibration: str | None = None,
               unlabeled: str | None = None) -> RunSpec:
    """A new work directory holding the run's spec (with its external sets and calibration
    sample, already resolved: :func:`cxr_core.data.external.resolve_external_sets`) and its
    resolved config."""
    import yaml

    from cxr_core.stages import new_run_dir

    spec = RunSpec(new_run_dir(runs_dir), Path(data_dir).resolve(), profile,
                   external=dict(external or {}), calibration=calibration, unlabeled=unlabeled)
    spec.config_path.write_text(
        yaml.safe_dump(cfg.model_dump(mode="json", exclude={"profile"}), sort_keys=False),
        encoding="utf-8")
    _write(spec)
    return spec


def load_run(runs_dir: Path, name: str) -> RunSpec:
    """The spec of run ``name`` under ``runs_dir``; InputError naming what is missing."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise InputError(f"{name!r} is not a run name (a folder name under {runs_dir})")
    run_dir = Path(runs_dir) / name
    if not run_dir.is_dir():
        raise InputError(f"cannot resume {name!r}: there is no run folder {run_dir}")
    path = run_dir / SPEC_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return RunSpec(run_dir, Path(raw["data_dir"]), raw["profile"], raw.get("manifest_hash"),
                       raw.get("data_fingerprint"), dict(raw.get("external") or {}),
                       raw.get("calibration"), raw.get("unlabeled"))
    except FileNotFoundError:
        raise InputError(f"cannot resume {name!r}: {path} is missing (a run started before "
                         "runs recorded their inputs, or not a run folder)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot resume {name!r}: {path} is unreadable: {exc}") from exc


def check_resume_args(spec: RunSpec, data_dir: str | Path | None, profile: str | None,
                      config: str | Path | None, external: dict[str, str] | None = None,
                      calibration: str | Path | None = None,
                      unlabeled: str | Path | None = None) -> None:
    """A resume reuses the run's inputs; explicit ones that differ are refused (they would
    silently mix two experiments in one tuner directory, or judge it on other sets)."""
    conflicts = _external_conflicts(spec, external, calibration)
    if unlabeled is not None and str(Path(unlabeled).resolve()) != spec.unlabeled:
        conflicts.append(f"unlabeled folder {unlabeled} (the run's: {spec.unlabeled or 'none'})")
    if data_dir is not None and Path(data_dir).resolve() != spec.data_dir:
        conflicts.append(f"data folder {data_dir} (the run's: {spec.data_dir})")
    if profile is not None and profile != spec.profile:
        conflicts.append(f"profile {profile!r} (the run's: {spec.profile!r})")
    if config is not None and load_config(Path(config), profile or spec.profile) != spec.config():
        conflicts.append(f"config {config} (differs from the run's {spec.config_path})")
    if conflicts:
        raise InputError(f"cannot resume {spec.name} with a different " + "; ".join(conflicts)
                         + f". Resume with `{spec.resume_command}` alone, or start a new run")


def _external_conflicts(spec: RunSpec, external: dict[str, str] | None,
                        calibration: str | Path | None) -> list[str]:
    conflicts = []
    for name, folder in sorted((external or {}).items()):
        if spec.external.get(name) != str(Path(folder).resolve()):
            conflicts.append(f"external set {name}={folder} (the run's: "
                             f"{spec.external.get(name) or 'none of that name'})")
    if calibration is not None and str(Path(calibration).resolve()) != spec.calibration:
        conflicts.append(f"calibration {calibration} (the run's: {spec.calibration or 'none'})")
    return conflicts


def check_data_unchanged(spec: RunSpec, cfg: ExperimentConfig, fingerprint: str) -> None:
    """Refuse to resume on data other than the run's: an unchanged file listing passes at
    once; otherwise the data is scanned again and its manifest hash compared. A run that never
    finished validating has no hash yet, and nothing to protect."""
    if spec.manifest_hash is None or fingerprint == spec.data_fingerprint:
        return
    from cxr_core.data.manifest import manifest_hash
    from cxr_core.data.splits import scan_and_split

    current = manifest_hash(scan_and_split(spec.data_dir, cfg.data, cfg.seed).manifest)
    if current != spec.manifest_hash:
        raise InputError(
            f"cannot resume {spec.name}: the data in {spec.data_dir} changed since the run "
            f"started (manifest hash {spec.manifest_hash[:12]} -> {current[:12]}); start a new "
            f"run instead: cxr run --data-dir {spec.data_dir} --profile {spec.profile} "
            f"--config {spec.config_path}")


def record_data(spec: RunSpec, manifest_hash: str, fingerprint: str) -> RunSpec:
    """Remember the validated data's identity (first validation of the run only)."""
    if spec.manifest_hash is not None:
        return spec
    spec = replace(spec, manifest_hash=manifest_hash, data_fingerprint=fingerprint)
    _write(spec)
    return spec


def _write(spec: RunSpec) -> None:
    record = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(spec).items()
              if k != "run_dir"}
    tmp = spec.run_dir / (SPEC_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    tmp.replace(spec.run_dir / SPEC_FILE)  # a kill mid-write leaves the old spec whole
