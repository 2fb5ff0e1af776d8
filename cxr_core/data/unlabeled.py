"""Unlabeled images from the deployment site (``cxr run --unlabeled DIR``), for the
pseudo-label round of final training (:mod:`cxr_core.training.pseudo_label`).

Any folder of images: labels in folder names, if any, are ignored. The images are scanned
like every other input (unreadable files are named and left out) and must share no image
with what selects or judges the model (the validation and test splits, the external sets,
the site-calibration sample): training on an image, even under its own pseudo-label,
flatters every figure later measured on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_core.data.external import (
    SCORABLE_FORMATS,
    excluded_files,
    shared_files,
    shared_image_problems,
)
from cxr_core.data.manifest import scan_images
from cxr_core.errors import InputError

UNLABELED_DIR = Path("unlabeled")
MAX_EXAMPLES = 5  # files named in a finding


def check_unlabeled_folder(folder: str | Path) -> str:
    """The ``--unlabeled`` folder, absolute, after checking that it exists (InputError)."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"--unlabeled {folder}: no such folder")
    return str(path.resolve())


@dataclass
class UnlabeledScan:
    """The scanned folder: every file's manifest row and what the checks found."""

    root: str
    manifest: pd.DataFrame
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        """Readable images in a format the model decodes, in path order: what is pseudo-labeled."""
        m = self.manifest
        keep = m["readable"].astype(bool) & m["format"].isin(SCORABLE_FORMATS)
        return sorted(m.loc[keep, "path"].astype(str))

    def findings(self) -> list[str]:
        """Warnings: files left out, images identical to training images."""
        r, lines = self.report, []
        if r["excluded"]:
            lines.append(f"unlabeled: {len(r['excluded'])} file(s) left out: " + "; ".join(
                f"{e['path']} ({e['reason']})" for e in r["excluded"][:MAX_EXAMPLES]))
        if r["shared_with_train"]:
            lines.append(f"unlabeled: {r['shared_with_train']} image(s) identical to training "
                         "images (they add nothing)")
        return lines


def scan_unlabeled(folder: str | Path, run_manifest: pd.DataFrame,
                   judges: Mapping[str, pd.DataFrame], workers: int = 0) -> UnlabeledScan:
    """Scan ``folder`` and check it against the run: InputError when it has no usable image,
    or shares images (sha256) with the run's validation or test split or with one of
    ``judges`` (what -> manifest: the external sets, the calibration sample)."""
    scan = scan_images(Path(folder), workers=workers)
    manifest = scan.manifest.assign(split_origin="unlabeled")
    result = UnlabeledScan(str(scan.root), manifest)
    if not result.paths:
        raise InputError(f"--unlabeled {folder}: no readable image the model can decode "
                         f"({len(manifest)} image file(s) found)")
    _check_disjoint(result, run_manifest, judges)
    train = run_manifest[run_manifest["split"] == "train"]
    result.report = {
        "root": result.root, "files": len(manifest), "usable": len(result.paths),
        "excluded": excluded_files(manifest, labelled=False), "junk_skipped": len(scan.skipped),
        "shared_with_train": shared_files(manifest, train)["count"],
    }
    return result


def _check_disjoint(scan: UnlabeledScan, run_manifest: pd.DataFrame,
                    judges: Mapping[str, pd.DataFrame]) -> None:
    checks = [("the validation split", run_manifest[run_manifest["split"] == "val"]),
              ("the test split", run_manifest[run_manifest["split"] == "test"]),
              *sorted(judges.items())]
    problems = shared_image_problems(scan.manifest, checks)
    if problems:
        raise InputError(f"--unlabeled {scan.root}: shares images (sha256) with data that "
                         "selects or judges the model; training on them, even pseudo-labeled, "
                         "would flatter its figures: " + " | ".join(problems))
