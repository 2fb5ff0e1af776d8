"""What every benchmark script shares: the data-folder argument, the results file, and the
machine/date/command stamp that makes a row of docs/benchmarks.md reproducible."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("benchmarks/results")


def add_data_and_json_args(parser: argparse.ArgumentParser, name: str) -> None:
    """``DATA_DIR`` (default ``$CXR_REAL_DATA``) and ``--json`` (default
    ``benchmarks/results/<name>.json``)."""
    parser.add_argument("data_dir", nargs="?", default=os.environ.get("CXR_REAL_DATA"),
                        help="a chest-xray-pneumonia folder (default: $CXR_REAL_DATA)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / f"{name}.json",
                        help="where the figures are written (JSON)")


def parse_with_data(parser: argparse.ArgumentParser,
                    argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the arguments; exit with a usage error when no data folder was given."""
    args = parser.parse_args(argv)
    if not args.data_dir and not getattr(args, "worker", None):
        parser.error("give DATA_DIR or set CXR_REAL_DATA")
    return args


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def machine() -> str:
    """CPU architecture, core count and processor name, as one line. On Linux the name
    comes from /proc/cpuinfo with its family and model numbers: VMs often report only
    "AMD EPYC", and the numbers tell the hosts behind that name apart when two rows'
    timings disagree."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or ""
    if "cpu family" in info:
        name += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    return f"{platform.machine()}, {os.cpu_count()} CPUs{', ' + name if name else ''}"


def write_results(path: Path | None, name: str, figures: dict[str, Any],
                  argv: list[str] | None = None) -> None:
    """Write ``figures`` to ``path`` (if given) with the benchmark's name, the date (UTC),
    the machine and the command line that produced them."""
    if path is None:
        return
    stamped = {
        "benchmark": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": "python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        **figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamped, indent=2))
