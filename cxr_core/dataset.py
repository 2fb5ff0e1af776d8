"""The data stage end to end: scan a folder, assign the final splits, validate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cxr_core.config import DataConfig, ValidationConfig
from cxr_core.manifest import ScanResult, scan_dataset
from cxr_core.splits import assign_splits
from cxr_core.validate import ValidationReport, validate_scan


def scan_and_split(data_dir: Path, data_cfg: DataConfig, seed: int) -> ScanResult:
    """Scan ``data_dir`` and carve val/test splits by patient where the folders lack them."""
    scan = scan_dataset(Path(data_dir), workers=data_cfg.scan_workers)
    manifest = assign_splits(
        scan.manifest,
        val_fraction=data_cfg.val_fraction,
        test_fraction=data_cfg.test_fraction,
        min_val_images=data_cfg.min_val_images,
        seed=seed,
    )
    return replace(scan, manifest=manifest)


def validate_dataset(data_dir: Path, data_cfg: DataConfig, validation_cfg: ValidationConfig,
                     seed: int, report_dir: Path | None = None) -> tuple[ScanResult, ValidationReport]:
    """Scan, split and validate; writes Data Docs, the JSON summary, the manifest and the
    quarantine list to ``report_dir`` when given. Never raises for bad data: read the report."""
    scan = scan_and_split(data_dir, data_cfg, seed)
    report = validate_scan(scan, validation_cfg, report_dir=report_dir, seed=seed)
    if report_dir is not None:
        from cxr_core.manifest import write_manifest

        write_manifest(scan.manifest, Path(report_dir) / "manifest.parquet")
        scan.quarantine.to_csv(Path(report_dir) / "quarantine.csv", index=False)
    return scan, report
