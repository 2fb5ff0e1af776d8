"""The cxr command line: help texts, exit codes and the data commands end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_console_script_help_lists_data_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "data" in out
    for sub in ("synth", "scan", "validate"):
        res = runner.invoke(app, ["data", sub, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output


def test_synth_then_validate_passes(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    res = runner.invoke(app, ["data", "synth", str(data), "--n-per-class", "40", "--size", "64",
                              "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert (data / "train" / "NORMAL").is_dir()
    res = runner.invoke(app, ["data", "validate", str(data), "--report-dir", str(tmp_path / "r"),
                              "--profile", "quick"])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output
    assert json.loads((tmp_path / "r" / "validation_summary.json").read_text())["passed"]


def test_synth_refuses_existing_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    res = runner.invoke(app, ["data", "synth", str(tmp_path), "--n-per-class", "4"])
    assert res.exit_code == 2 and (tmp_path / "keep.txt").read_text() == "mine"


def test_validate_malformed_exits_1_naming_files(malformed_corpus: dict[str, Path],
                                                 tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {min_val_images: 0}\nvalidation: {min_width: 16, min_height: 16, "
                   "min_images_per_class: 2}\n")
    res = runner.invoke(app, ["data", "validate", str(malformed_corpus["root"]), "--config",
                              str(cfg), "--report-dir", str(tmp_path / "r")])
    assert res.exit_code == 1
    for key in ("truncated", "zero_byte", "text", "tiny", "leak_train", "unknown_file"):
        assert str(malformed_corpus[key].resolve()) in res.output


def test_scan_writes_manifest_and_quarantine(malformed_corpus: dict[str, Path],
                                             tmp_path: Path) -> None:
    out = tmp_path / "m.parquet"
    res = runner.invoke(app, ["data", "scan", str(malformed_corpus["root"]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = pd.read_parquet(out)
    assert (~m["readable"]).sum() == 3
    q = pd.read_csv(tmp_path / "m.quarantine.csv")
    assert set(q["path"]) == {str(malformed_corpus[k].resolve())
                              for k in ("truncated", "zero_byte", "text")}
    assert "zero-byte file" in res.output


@pytest.mark.parametrize("args", [["data", "scan", "/nonexistent/dir"],
                                  ["data", "validate", "/nonexistent/dir"],
                                  ["data", "validate", ".", "--profile", "nope"]])
def test_bad_input_exits_2_with_message(args: list[str], tmp_path: Path) -> None:
    res = runner.invoke(app, args + (["--report-dir", str(tmp_path)] if "validate" in args else []))
    assert res.exit_code == 2
    assert "error:" in res.output
