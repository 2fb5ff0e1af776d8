"""``cxr data``: synthesize a demo set, scan a folder into a manifest, validate it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import EXIT_BAD_INPUT, EXIT_REJECTED, ConfigOpt, ProfileOpt, fail, load_cfg

app = typer.Typer(
    help="Data commands: synthesize a demo set, scan a folder into a manifest, validate it.",
    no_args_is_help=True,
)


@app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to create (must be empty or absent).")],
    n_per_class: Annotated[int, typer.Option(help="Images per class over all splits.")] = 120,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    fmt: Annotated[str, typer.Option(
        "--format", help="jpeg, or dicom: DICOM files with fake patient identifiers in their "
        "headers (8-16 bit, windowed, MONOCHROME1, RLE, some without extension).")] = "jpeg",
) -> None:
    """Write a synthetic chest X-ray data set in the Kaggle layout (train/val/test x
    NORMAL/PNEUMONIA, JPEG or DICOM, several images per patient)."""
    from cxr_core.data.synth import synthesize_dataset

    try:
        summary = synthesize_dataset(out, n_per_class=n_per_class, size=size, seed=seed,
                                     fmt=fmt.lower())
    except (FileExistsError, ValueError) as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    typer.echo(f"wrote {summary.root} ({summary.n_patients} patients)")
    for split, counts in summary.counts.items():
        typer.echo(f"  {split:5s}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@app.command("scan")
def data_scan(
    data_dir: Annotated[Path, typer.Argument(help="Data set root (Kaggle chest-xray layout).")],
    out: Annotated[Path, typer.Option("--out", help="Manifest file (.parquet or .csv).")] = Path(
        "manifest.parquet"),
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Scan a data set into an image manifest (one row per file, every image decoded) and
    assign the final splits (val/test carved from train by patient where missing). Writes the
    quarantine list of unreadable files beside the manifest. Never changes the source files."""
    from cxr_core.data.manifest import write_manifest
    from cxr_core.data.splits import scan_and_split

    cfg = load_cfg(config, profile)
    scan = scan_and_split(data_dir, cfg.data, cfg.seed)
    path = write_manifest(scan.manifest, out)
    quarantine = path.with_name(path.stem + ".quarantine.csv")
    scan.quarantine.to_csv(quarantine, index=False)
    m = scan.manifest
    typer.echo(f"scanned {scan.root}: {len(m)} images, {int((~m['readable']).sum())} unreadable, "
               f"{len(scan.skipped)} junk skipped")
    for (split, label), n in m.groupby(["split", "label"], dropna=False).size().items():
        typer.echo(f"  {split:5s} {label}: {n}")
    for row in scan.quarantine.itertuples():
        typer.echo(f"  unreadable: {row.path}: {row.error}")
    typer.echo(f"manifest: {path}\nquarantine: {quarantine}")


@app.command("validate")
def data_validate(
    data_dir: Annotated[Path, typer.Argument(help="Data set root (Kaggle chest-xray layout).")],
    report_dir: Annotated[Path | None, typer.Option(
        "--report-dir", help="Where to write Data Docs (HTML), the JSON summary, the manifest "
        "and the quarantine list. Default: <home>/reports/validation.")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Validate a data set with great_expectations: readable files, sizes, duplicates,
    leakage between splits, patients across splits, class balance and a size-shortcut
    audit. Exit 0 when it passes, 1 when an error-severity check fails (every offending
    file is named)."""
    from cxr_core.data.validate import validate_dataset
    from cxr_core.settings import get_settings

    cfg = load_cfg(config, profile)
    report_dir = report_dir or get_settings().home / "reports" / "validation"
    _, report = validate_dataset(data_dir, cfg.data, cfg.validation, cfg.seed, report_dir)
    typer.echo(report.summary_text())
    typer.echo(f"  JSON summary: {report_dir / 'validation_summary.json'}")
    raise typer.Exit(0 if report.passed else EXIT_REJECTED)
