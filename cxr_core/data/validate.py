"""Data validation with great_expectations 1.x over the image manifest.

Every check is a GX expectation tagged with a severity in its ``meta``: a failed ``error``
fails the data set, a failed ``warning`` is reported. Results name each offending file.
Three GX batches are validated: the manifest (one row per file), the class counts (one row
per split and class) and the shortcut audit (one row for image size, one per shortcut score
and split: :mod:`cxr_core.evaluation.shortcuts`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_core.config import DataConfig, ValidationConfig
from cxr_core.data.dicom_checks import dicom_expectations, dicom_frame, dicom_observed
from cxr_core.data.labels import LABELS
from cxr_core.data.manifest import (
    FORMAT_EXTENSIONS,
    IMAGE_EXTENSIONS,
    MANIFEST_COLUMNS,
    ScanResult,
    manifest_hash,
)
from cxr_core.data.splits import carved_overlap_mask, scan_and_split
from cxr_core.evaluation.shortcuts import SCORE_DESCRIPTIONS, score_aucs, shortcut_auc

ERROR = "error"
WARNING = "warning"
EIGHT_BIT_MODES = ("L", "RGB")
MAX_LISTED = 50  # offending items kept per check in the summary (all are in the Data Docs)


@dataclass
class CheckResult:
    """One expectation's verdict, with what it looked at and what broke it."""

    name: str
    severity: str
    success: bool
    description: str
    observed: str = ""
    offending: list[str] = field(default_factory=list)
    n_offending: int = 0


@dataclass
class ValidationReport:
    """All checks over one data set; ``passed`` is False when any error-severity check failed."""

    data_root: str
    n_images: int
    manifest_hash: str
    checks: list[CheckResult]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    shortcut_auc: float | None = None
    data_docs_index: str | None = None
    # Per shortcut score and split: how well it alone separates the classes
    # (cxr_core.evaluation.shortcuts.score_aucs).
    shortcut_scores: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success and c.severity == ERROR]

    @property
    def warnings(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success and c.severity == WARNING]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["n_errors"] = len(self.errors)
        d["n_warnings"] = len(self.warnings)
        return d

    def summary_text(self) -> str:
        """A readable summary naming every offending file (up to MAX_LISTED per check)."""
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"Data validation {verdict}: {self.data_root}",
            f"  {self.n_images} images; {len(self.errors)} error(s), {len(self.warnings)} "
            f"warning(s); {len(self.skipped)} junk file(s) skipped",
        ]
        for split, counts in self.split_counts.items():
            lines.append(f"  {split:5s}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for check in self.errors + self.warnings:
            tag = "ERROR" if check.severity == ERROR else "WARN "
            lines.append(f"[{tag}] {check.name}: {check.description}")
            if check.observed:
                lines.append(f"         observed: {check.observed}")
            for item in check.offending:
                lines.append(f"         - {item}")
            if check.n_offending > len(check.offending):
                lines.append(f"         ... and {check.n_offending - len(check.offending)} more")
        if self.data_docs_index:
            lines.append(f"  Data Docs: {self.data_docs_index}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- frames


def _format_matches_extension(row: pd.Series) -> bool:
    if not row["readable"] or row["format"] not in FORMAT_EXTENSIONS:
        return True  # unreadable files are reported by their own check
    if row["format"] == "DICOM" and row["extension"] not in IMAGE_EXTENSIONS:
        return True  # DICOM archives name files by UID or not at all: found by the preamble
    return row["extension"] in FORMAT_EXTENSIONS[row["format"]]


def manifest_frame(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest plus derived per-row columns the expectations look at."""
    df = manifest.copy()
    df["format_matches_extension"] = df.apply(_format_matches_extension, axis=1) if len(df) else []
    sha_splits = df.groupby("sha256")["split"].transform("nunique")
    df["duplicate_across_splits"] = (sha_splits > 1).fillna(False).astype(bool)
    carved = carved_overlap_mask(df) if len(df) else pd.Series([], dtype=bool)
    pid_splits = df.groupby("patient_id")["split"].transform("nunique")
    df["patient_in_carved_splits"] = carved.astype(bool)
    df["patient_in_given_splits"] = ((pid_splits > 1) & ~carved).fillna(False).astype(bool)
    df["eight_bit_mode"] = df["mode"].isin(EIGHT_BIT_MODES) | df["mode"].isna()
    df["patient_in_both_classes"] = df["patient_id"].isin(patients_in_both_classes(df))
    return df


def patients_in_both_classes(manifest: pd.DataFrame) -> list[str]:
    """Inferred patient ids with images under both NORMAL/ and PNEUMONIA/, sorted."""
    labelled = manifest[manifest["label"].isin(LABELS)]
    n_labels = labelled.groupby("patient_id")["label"].nunique()
    return sorted(str(p) for p in n_labels.index[n_labels > 1])


def class_count_frame(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per (split, class) that should exist, with its readable-image count and share."""
    ok = manifest[manifest["readable"] & manifest["label"].isin(LABELS)]
    splits = [s for s in ("train", "val", "test") if (manifest["split"] == s).any()] or ["train"]
    rows = []
    for split in splits:
        total = int((ok["split"] == split).sum())
        for label in LABELS:
            n = int(((ok["split"] == split) & (ok["label"] == label)).sum())
            share = (n / total) if total else 0.0
            rows.append({"group": f"{split}/{label}: {n} images ({share:.0%})", "split": split,
                         "label": label, "count": n, "fraction": share})
    return pd.DataFrame(rows)


def score_group(row: dict[str, Any]) -> str:
    """How one shortcut score's audit of one split reads in the report (the offending item)."""
    return (f"{row['score']} in {row['split']}: ROC-AUC {row['auc']:.3f}, higher in "
            f"{row['higher_in']} ({SCORE_DESCRIPTIONS.get(row['score'], row['score'])})")


def shortcut_audit_frame(size_auc: float | None, scores: list[dict[str, Any]]) -> pd.DataFrame:
    """One row for the image-size audit, one per shortcut score and split with an AUC. A
    missing figure (too little data; the other audit's row) is null, which the expectation
    skips."""
    rows = [{"group": "all", "shortcut_auc": size_auc, "score_auc": None}]
    rows += [{"group": score_group(r), "shortcut_auc": None, "score_auc": r["auc"]}
             for r in scores if r["auc"] is not None]
    return pd.DataFrame(rows).astype({"shortcut_auc": "float64", "score_auc": "float64"})


def _highest_score_auc(scores: list[dict[str, Any]]) -> str:
    audited = [r for r in scores if r["auc"] is not None]
    if not audited:
        return "too little data for the audit (or no shortcut scores in the manifest)"
    return f"highest: {score_group(max(audited, key=lambda r: r['auc']))}"


# ---------------------------------------------------------------------------- expectations


def _expectations(cfg: ValidationConfig) -> dict[str, list[Any]]:
    """The suites, keyed by the GX batch they run on.

    Long because it is one declarative table, an expectation per check with its severity;
    split up, the suite could no longer be read in one place."""
    import great_expectations.expectations as gxe

    def meta(check: str, severity: str, description: str) -> dict[str, str]:
        return {"check": check, "severity": severity, "description": description}

    manifest = [
        gxe.ExpectTableColumnsToMatchSet(
            column_set=MANIFEST_COLUMNS, exact_match=False,
            meta=meta("required_columns", ERROR, "manifest has every required column")),
        *[
            gxe.ExpectColumnValuesToNotBeNull(
                column=col, meta=meta(f"{col}_not_null", ERROR, desc))
            for col, desc in [
                ("path", "every row names a file"),
                ("split", "every file belongs to a split"),
                ("sha256", "every file could be read and hashed"),
                ("label", "every file sits in a NORMAL/ or PNEUMONIA/ class folder"),
                ("patient_id", "every file has a patient id"),
            ]
        ],
        gxe.ExpectColumnValuesToBeInSet(
            column="label", value_set=list(LABELS),
            meta=meta("label_known", ERROR, "label is NORMAL or PNEUMONIA")),
        gxe.ExpectColumnValuesToBeInSet(
            column="readable", value_set=[True],
            meta=meta("readable", ERROR, "every file decodes fully as an image")),
        gxe.ExpectColumnValuesToBeBetween(
            column="width", min_value=cfg.min_width, max_value=cfg.max_width,
            meta=meta("width_in_bounds", ERROR,
                      f"width between {cfg.min_width} and {cfg.max_width} px")),
        gxe.ExpectColumnValuesToBeBetween(
            column="height", min_value=cfg.min_height, max_value=cfg.max_height,
            meta=meta("height_in_bounds", ERROR,
                      f"height between {cfg.min_height} and {cfg.max_height} px")),
        gxe.ExpectColumnValuesToBeInSet(
            column="duplicate_across_splits", value_set=[False],
            meta=meta("no_duplicates_across_splits", ERROR,
                      "no identical file (sha256) in two splits (leakage)")),
        gxe.ExpectColumnValuesToBeInSet(
            column="patient_in_carved_splits", value_set=[False],
            meta=meta("no_patient_in_carved_splits", ERROR,
                      "no patient in two splits that cxr carved")),
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=["split", "sha256"],
            meta=meta("no_duplicates_within_split", WARNING,
                      "no identical file (sha256) twice in one split")),
        gxe.ExpectColumnValuesToBeInSet(
            column="patient_in_given_splits", value_set=[False],
            meta=meta("no_patient_in_given_splits", WARNING,
                      "no inferred patient id in two of the given split folders "
                      "(ids come from file names and may not be true identities)")),
        # A warning, not an error: ids come from file names, so this is usually two people
        # sharing a name pattern (or one patient imaged twice), and carving keeps every id's
        # images in one split whatever their labels, so it cannot leak.
        gxe.ExpectColumnValuesToBeInSet(
            column="patient_in_both_classes", value_set=[False],
            meta=meta("no_patient_in_both_classes", WARNING,
                      "no inferred patient id has images in both NORMAL/ and PNEUMONIA/ "
                      "(an id collision or a labelling slip; its images stay in one split)")),
        gxe.ExpectColumnValuesToBeInSet(
            column="eight_bit_mode", value_set=[True],
            meta=meta("eight_bit_gray_or_rgb", WARNING,
                      "image mode is 8-bit L or RGB (others are converted to 8-bit gray at load)")),
        gxe.ExpectColumnValuesToBeInSet(
            column="format_matches_extension", value_set=[True],
            meta=meta("format_matches_extension", WARNING,
                      "the decoded format matches the file extension")),
    ]
    counts = [
        gxe.ExpectColumnValuesToBeBetween(
            column="count", min_value=cfg.min_images_per_class,
            meta=meta("min_images_per_class", ERROR,
                      f"at least {cfg.min_images_per_class} readable images per class and split")),
        gxe.ExpectColumnValuesToBeBetween(
            column="fraction", min_value=cfg.min_class_fraction, max_value=cfg.max_class_fraction,
            meta=meta("class_fraction_in_bounds", ERROR,
                      f"each class is {cfg.min_class_fraction:.0%}-{cfg.max_class_fraction:.0%} "
                      "of its split")),
    ]
    audit = [
        gxe.ExpectColumnValuesToBeBetween(
            column="shortcut_auc", max_value=cfg.shortcut_auc_warn,
            meta=meta("size_shortcut", WARNING,
                      f"image size alone separates the classes with ROC-AUC <= "
                      f"{cfg.shortcut_auc_warn}")),
        gxe.ExpectColumnValuesToBeBetween(
            column="score_auc", max_value=cfg.shortcut_auc_warn,
            meta=meta("image_score_shortcut", WARNING,
                      "no shortcut score (burned-in annotations in the top corners or along "
                      "the sides, field of view) alone separates the classes of a split with "
                      f"ROC-AUC above {cfg.shortcut_auc_warn}")),
    ]
    return {"manifest": manifest, "class_counts": counts, "shortcut_audit": audit}


def _gx_context(docs_dir: Path | None) -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        ctx.add_data_docs_site(
            site_name="cxr",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return ctx


def _offending(result: dict[str, Any], key_column: str) -> list[str]:
    items = result.get("unexpected_index_list") or []
    names = [str(i.get(key_column)) for i in items if isinstance(i, dict)]
    if not names and result.get("partial_unexpected_list"):
        names = [str(v) for v in result["partial_unexpected_list"]]
    return names


def _run_suite(ctx: Any, name: str, frame: pd.DataFrame, expectations: list[Any],
               key_column: str, with_docs: bool) -> list[CheckResult]:
    import great_expectations as gx

    asset = ctx.data_sources.add_pandas(f"{name}_source").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"cxr_{name}"))
    for exp in expectations:
        suite.add_expectation(exp)
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"cxr_{name}", data=batch, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if with_docs else []
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name=f"cxr_{name}", validation_definitions=[definition], actions=actions,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key_column]},
    ))
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    checks = []
    for run in outcome.run_results.values():
        for res in run.results:
            m = res.expectation_config.meta or {}
            result = res.result or {}
            offending = _offending(result, key_column)
            observed = ""
            if res.exception_info and res.exception_info.get("raised_exception"):
                observed = f"expectation raised: {res.exception_info.get('exception_message')}"
            elif "unexpected_count" in result:
                observed = f"{result['unexpected_count']} of {result.get('element_count')} rows"
            elif "observed_value" in result:
                observed = str(result["observed_value"])
            checks.append(CheckResult(
                name=m.get("check", res.expectation_config.type),
                severity=m.get("severity", ERROR),
                success=bool(res.success),
                description=m.get("description", res.expectation_config.type),
                observed=observed,
                offending=offending[:MAX_LISTED],
                n_offending=len(offending),
            ))
    return checks


def _layout_checks(scan: ScanResult) -> list[CheckResult]:
    """Folder-level facts that are not rows of the manifest."""
    checks = []
    checks.append(CheckResult(
        name="no_empty_class_folders", severity=ERROR, success=not scan.empty_class_dirs,
        description="every class folder holds at least one image",
        offending=scan.empty_class_dirs[:MAX_LISTED], n_offending=len(scan.empty_class_dirs)))
    checks.append(CheckResult(
        name="no_unknown_class_folders", severity=WARNING, success=not scan.unknown_class_dirs,
        description="class folders are NORMAL/ and PNEUMONIA/ only (files elsewhere are errors)",
        offending=scan.unknown_class_dirs[:MAX_LISTED], n_offending=len(scan.unknown_class_dirs)))
    return checks


def validate_scan(scan: ScanResult, cfg: ValidationConfig, report_dir: Path | None = None,
                  seed: int = 0) -> ValidationReport:
    """Run every expectation over a scanned (and split-assigned) data set.

    With ``report_dir``, GX Data Docs (HTML) go to ``report_dir/data_docs`` and a JSON summary
    to ``report_dir/validation_summary.json``.
    """
    manifest = scan.manifest
    docs_dir = Path(report_dir) / "data_docs" if report_dir is not None else None
    ctx = _gx_context(docs_dir)
    suites = _expectations(cfg)
    auc = shortcut_auc(manifest, seed=seed)
    scores = score_aucs(manifest)
    frames = {
        "manifest": (manifest_frame(manifest), "path"),
        "class_counts": (class_count_frame(manifest), "group"),
        "shortcut_audit": (shortcut_audit_frame(auc, scores), "group"),
    }
    dicom = dicom_frame(manifest)
    if dicom is not None:  # DICOM header checks, only for data sets that have DICOM files
        frames["dicom_header"] = (dicom, "path")
        suites["dicom_header"] = dicom_expectations(ERROR, WARNING)
    checks = _layout_checks(scan)
    for name, (frame, key) in frames.items():
        checks += _run_suite(ctx, name, frame, suites[name], key, with_docs=docs_dir is not None)
    if dicom is not None:
        dicom_observed(checks, dicom)
    for check in checks:
        if check.name == "size_shortcut":  # say the figure, not "1 of 1 rows"
            check.observed = ("too little data for the audit" if auc is None else
                              f"ROC-AUC {auc:.3f} from width, height and aspect ratio")
            check.offending, check.n_offending = [], 0
        elif check.name == "image_score_shortcut":
            check.observed = _highest_score_auc(scores)
        elif check.name == "no_patient_in_both_classes" and not check.success:
            ids = patients_in_both_classes(manifest)
            listed = ", ".join(ids[:MAX_LISTED]) + (" ..." if len(ids) > MAX_LISTED else "")
            check.observed = f"{check.observed}; patient id(s): {listed}"

    counts = class_count_frame(manifest)
    report = ValidationReport(
        data_root=str(scan.root),
        n_images=len(manifest),
        manifest_hash=manifest_hash(manifest),
        checks=checks,
        skipped=list(scan.skipped),
        split_counts={s: {r.label: int(r.count)
                          for r in g.itertuples()} for s, g in counts.groupby("split", sort=False)},
        shortcut_auc=auc,
        shortcut_scores=scores,
        data_docs_index=str(docs_dir / "index.html") if docs_dir is not None else None,
    )
    if report_dir is not None:
        write_report(report, Path(report_dir))
    return report


def write_report(report: ValidationReport, report_dir: Path) -> Path:
    """Write the JSON summary beside the Data Docs; returns its path."""
    report_dir.mkdir(parents=True, exist_ok=True)
    out = report_dir / "validation_summary.json"
    out.write_text(json.dumps(report.to_dict(), indent=2, default=str), encoding="utf-8")
    return out


def validate_dataset(data_dir: Path, data_cfg: DataConfig, validation_cfg: ValidationConfig,
                     seed: int, report_dir: Path | None = None) -> tuple[ScanResult, ValidationReport]:
    """Scan, split and validate; writes Data Docs, the JSON summary, the manifest and the
    quarantine list to ``report_dir`` when given. Never raises for bad data: read the report."""
    from cxr_core.data.manifest import write_manifest

    scan = scan_and_split(data_dir, data_cfg, seed)
    report = validate_scan(scan, validation_cfg, report_dir=report_dir, seed=seed)
    if report_dir is not None:
        write_manifest(scan.manifest, Path(report_dir) / "manifest.parquet")
        scan.quarantine.to_csv(Path(report_dir) / "quarantine.csv", index=False)
    return scan, report
