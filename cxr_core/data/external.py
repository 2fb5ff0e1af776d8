"""External validation sets and the site-calibration sample: where they come from (the
config's ``data.external`` and ``cxr run --external NAME=DIR``), and what is checked before
any training starts.

Each folder is scanned by :func:`cxr_core.data.manifest.scan_dataset`, so any layout it
accepts works (a ``test/`` split, ``NORMAL/`` and ``PNEUMONIA/`` directly, or several split
folders: every image counts). Unreadable files are named and left out of scoring; images
identical (sha256) to the run's own train/val/test images, and inferred patient ids the
run's data also has, are reported. These sets are scored only after the model and its
threshold exist (:mod:`cxr_core.evaluation.external`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_core.config import EXTERNAL_NAME_PATTERN, ExperimentConfig
from cxr_core.data.inputs import TF_DECODABLE
from cxr_core.data.labels import LABELS
from cxr_core.data.manifest import find_data_root, scan_dataset, write_manifest
from cxr_core.errors import DataLayoutError, InputError

MAX_EXAMPLES = 10  # shared files, patients and bad files listed per report (counts are whole)
CALIBRATION = "calibration"  # the site-calibration sample's name in reports
SCAN_REPORT = "scan_report.json"
SCAN_MANIFEST = "manifest.parquet"
SCORABLE_FORMATS = TF_DECODABLE  # what the model's input pipeline decodes


def parse_external_options(values: Sequence[str]) -> dict[str, str]:
    """``--external NAME=DIR`` values -> {name: dir}. InputError naming the option for a value
    without ``=``, a bad name (lowercase letters, digits, ``_``, ``-``), an empty folder or a
    name given twice."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not folder:
            raise InputError(f"--external {value!r}: expected NAME=DIR, e.g. site-b=/data/site_b")
        if not re.match(EXTERNAL_NAME_PATTERN, name):
            raise InputError(f"--external {value!r}: the name {name!r} must be lowercase letters, "
                             "digits, '_' or '-' (it names metrics, tags and folders)")
        if name in out:
            raise InputError(f"--external: the name {name!r} is given twice "
                             f"({out[name]} and {folder})")
        out[name] = folder
    return out


def _checked_folder(folder: str | Path, what: str) -> str:
    """``folder`` made absolute, after checking it holds a layout the scanner accepts."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise InputError(f"{what}: {path} is not a folder")
    try:
        find_data_root(path)
    except DataLayoutError as exc:
        raise InputError(f"{what}: {exc}") from exc
    return str(path.resolve())


def resolve_external_sets(cfg: ExperimentConfig, cli: Mapping[str, str] | None = None) -> dict[str, str]:
    """The run's external sets: the config's ``data.external`` updated by the command line's
    (the command line wins on a name), each an absolute folder with a usable layout. Every
    ``gates.external`` name must be one of them. InputError otherwise, before anything runs."""
    merged = {s.name: s.path for s in cfg.data.external}
    merged.update(cli or {})
    sets = {name: _checked_folder(folder, f"external set {name!r}")
            for name, folder in sorted(merged.items())}
    unknown = sorted(set(cfg.gates.external) - set(sets))
    if unknown:
        raise InputError(f"gates.external names {', '.join(map(repr, unknown))}, not an external "
                         f"set of this run (sets: {', '.join(sets) or 'none'}; add one with "
                         "data.external or --external NAME=DIR)")
    return sets


def check_calibration_folder(folder: str | Path) -> str:
    """The ``--calibration`` folder, absolute, after checking its layout (InputError)."""
    return _checked_folder(folder, "--calibration")


@dataclass
class ExternalScan:
    """One scanned set: every file's manifest row and what the checks found."""

    name: str
    root: str
    manifest: pd.DataFrame
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def usable(self) -> pd.DataFrame:
        """Readable, labelled rows in a format the model decodes, in path order: what is scored."""
        m = self.manifest
        keep = m["readable"].astype(bool) & m["label"].isin(LABELS) & m["format"].isin(SCORABLE_FORMATS)
        return m[keep].sort_values("path").reset_index(drop=True)

    def findings(self) -> list[str]:
        """One line per thing worth a warning (excluded files, data shared with the run)."""
        r, lines = self.report, []
        if r["excluded"]:
            lines.append(f"{self.name}: {len(r['excluded'])} file(s) not scored: "
                         + "; ".join(f"{e['path']} ({e['reason']})" for e in r["excluded"][:MAX_EXAMPLES]))
        shared = r["shared_files"]
        if shared["count"]:
            lines.append(f"{self.name}: {shared['count']} image(s) identical (sha256) to images of "
                         f"this run's data ({_by_split(shared['by_split'])}), e.g. "
                         + "; ".join(shared["examples"]))
        patients = r["shared_patients"]
        if patients["count"]:
            lines.append(f"{self.name}: {patients['count']} inferred patient id(s) also in this "
                         f"run's data ({_by_split(patients['by_split'])}; ids come from file names "
                         "and may not be the same person), e.g. " + ", ".join(patients["examples"]))
        warn = r.get("shortcut_auc_warn", 1.0)
        for row in r.get("shortcut_scores", []):
            if row["auc"] is not None and row["auc"] >= warn:
                lines.append(f"{self.name}: {row['score']} alone separates the classes with "
                             f"ROC-AUC {row['auc']:.3f} (higher in {row['higher_in']}): a "
                             "shortcut cue also present here (README, \"Shortcut audit\")")
        return lines


def _by_split(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{split} {n}" for split, n in sorted(counts.items()))


def excluded_files(manifest: pd.DataFrame, labelled: bool = True) -> list[dict[str, str]]:
    """Files that cannot be used, each with the reason (all of them: the report names each):
    unreadable, undecodable by the model's input pipeline, and (``labelled``) outside a
    class folder."""
    out = []
    for row in manifest.sort_values("path").itertuples(index=False):
        if not bool(row.readable):
            reason = f"unreadable: {row.error}"
        elif labelled and row.label not in LABELS:
            reason = "not in a NORMAL/ or PNEUMONIA/ folder (no label)"
        elif row.format not in SCORABLE_FORMATS:
            reason = f"format {row.format} is not decoded by the model's input pipeline"
        else:
            continue
        out.append({"path": str(row.path), "reason": reason})
    return out


def _run_rows(run_manifest: pd.DataFrame) -> pd.DataFrame:
    """The run's own images (train, val and test as the run split them)."""
    return run_manifest[run_manifest["split"].isin(("train", "val", "test"))]


def shared_files(rows: pd.DataFrame, run_manifest: pd.DataFrame) -> dict[str, Any]:
    """Images of ``rows`` identical (sha256) to an image of the run: count, per run split, and
    examples ``external path = run path (split)``."""
    run = _run_rows(run_manifest).dropna(subset=["sha256"]).drop_duplicates("sha256")
    joined = rows.dropna(subset=["sha256"]).merge(run[["sha256", "path", "split"]], on="sha256",
                                                  suffixes=("", "_run"))
    examples = [f"{r.path} = {r.path_run} ({r.split_run})"
                for r in joined.head(MAX_EXAMPLES).itertuples(index=False)]
    return {"count": int(joined["sha256"].nunique()),
            "by_split": {str(k): int(v) for k, v in joined.groupby("split_run").size().items()},
            "examples": examples}


def shared_patients(rows: pd.DataFrame, run_manifest: pd.DataFrame) -> dict[str, Any]:
    """Inferred patient ids of ``rows`` that the run's data also has: count, per run split,
    and example ids."""
    run = _run_rows(run_manifest)[["patient_id", "split"]].dropna().astype(str)
    ids = set(rows["patient_id"].dropna().astype(str))
    hits = run[run["patient_id"].isin(ids)].drop_duplicates()
    shared = sorted(set(hits["patient_id"]))
    return {"count": len(shared),
            "by_split": {str(k): int(v) for k, v in hits.groupby("split").size().items()},
            "examples": shared[:MAX_EXAMPLES]}


def scan_external_set(name: str, folder: str | Path, run_manifest: pd.DataFrame,
                      workers: int = 0, warn_auc: float = 0.75) -> ExternalScan:
    """Scan and check one set against the run's manifest, with its shortcut audit (scores
    whose ROC-AUC reaches ``warn_auc`` are findings). InputError naming the set when it
    has no scorable labelled images of both classes."""
    scan = scan_dataset(Path(folder), workers=workers)
    manifest = scan.manifest.assign(split="external", split_origin="external")
    result = ExternalScan(name, str(scan.root), manifest)
    usable = result.usable
    counts = {label: int((usable["label"] == label).sum()) for label in LABELS}
    if min(counts.values()) == 0:
        raise InputError(
            f"{'--calibration' if name == CALIBRATION else f'external set {name!r}'} ({scan.root}):"
            f" no scorable labelled images of both classes ({_by_split(counts)}); expected "
            "NORMAL/ and PNEUMONIA/ folders, directly or under a split folder such as test/")
    result.report = {
        "name": name, "root": str(scan.root), "files": len(manifest), "scored": len(usable),
        "classes": counts, "patients": int(usable["patient_id"].nunique()),
        "excluded": excluded_files(manifest), "junk_skipped": len(scan.skipped),
        "shared_files": shared_files(usable, run_manifest),
        "shared_patients": shared_patients(usable, run_manifest),
        "shortcut_scores": set_score_aucs(usable),
        "shortcut_auc_warn": warn_auc,
    }
    return result


def set_score_aucs(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """The shortcut audit of one external set: how well each per-image score (burned-in
    annotations, field of view) alone separates its classes (see
    :func:`cxr_core.evaluation.shortcuts.score_aucs`). Beside the training splits' figures it
    tells whether a cue the model may have learned still holds at the other site."""
    from cxr_core.evaluation.shortcuts import score_aucs

    return [{**r, "split": "external"} for r in score_aucs(rows.assign(split="test"))]


def write_scan(scan: Any, out_dir: Path) -> Path:
    """The set's manifest and report under ``out_dir`` (``manifest.parquet``,
    ``scan_report.json``); returns the report's path."""
    out_dir = Path(out_dir)
    write_manifest(scan.manifest, out_dir / SCAN_MANIFEST)
    path = out_dir / SCAN_REPORT
    path.write_text(json.dumps(scan.report, indent=2, default=str), encoding="utf-8")
    return path


def shared_image_problems(rows: pd.DataFrame,
                          others: Sequence[tuple[str, pd.DataFrame]]) -> list[str]:
    """One line per (what, manifest) of ``others`` that shares images (sha256) with ``rows``:
    how many, with the first pairs of paths named."""
    rows = rows.dropna(subset=["sha256"])
    problems = []
    for what, frame in others:
        hits = rows.merge(frame.dropna(subset=["sha256"])[["sha256", "path"]], on="sha256",
                          suffixes=("", "_other"))
        if len(hits):
            named = "; ".join(f"{r.path} = {r.path_other}" for r in hits.head(MAX_EXAMPLES).itertuples())
            more = f" and {len(hits) - MAX_EXAMPLES} more" if len(hits) > MAX_EXAMPLES else ""
            problems.append(f"{len(hits)} with {what}: {named}{more}")
    return problems


def check_calibration_disjoint(calibration: ExternalScan, externals: Mapping[str, ExternalScan],
                               run_manifest: pd.DataFrame) -> None:
    """The calibration sample must share no image (sha256) with an evaluation set: an
    external set or the run's test split. InputError naming the shared files otherwise."""
    judges = [(f"external set {name!r}", s.manifest) for name, s in sorted(externals.items())]
    judges.append(("the test split", run_manifest[run_manifest["split"] == "test"]))
    problems = shared_image_problems(calibration.manifest, judges)
    if problems:
        raise InputError(f"--calibration {calibration.root}: shares images (sha256) with an "
                         "evaluation set; a threshold chosen on them would be judged on them: "
                         + " | ".join(problems))
