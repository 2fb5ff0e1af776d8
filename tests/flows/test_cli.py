"""The cxr command line: help texts, exit codes and the data commands end to end."""

from __future__ import annotations

import json
import os
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


# --- exit codes: 2 for bad usage or input, 1 only for rejections, never a traceback ---------

@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A private state home and sqlite registry; MLflow gives up on a dead server at once."""
    return {"CXR_HOME": str(tmp_path / "home"), "CXR_TRACKING_URI": f"sqlite:///{tmp_path}/m.db",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "CXR_PREFECT_API_URL": None,
            "PREFECT_API_URL": None}


def _expect_exit(args: list[str], env: dict[str, str | None], code: int, *named: str):
    """Run ``cxr ARGS`` in-process: exit ``code`` with ``error: ...`` naming each of ``named``,
    and no exception escaping the command (what prints a traceback)."""
    res = runner.invoke(app, args, env=env)
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "error:" in res.output and "Traceback" not in res.output
    for name in named:
        assert name in res.output, (name, res.output)
    return res


def _dead_url() -> str:
    from flows.servers import free_port

    return f"http://127.0.0.1:{free_port()}"


def test_bad_input_exits_2_naming_the_thing(tmp_path: Path, cli_env) -> None:
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "afile").write_text("x")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    cases = [
        (["data", "scan", str(empty)], "no train/"),
        (["data", "validate", str(empty), "--report-dir", str(tmp_path / "r")], "no train/"),
        (["data", "validate", str(empty), "--config", str(binary)], "binary.yaml"),
        (["data", "validate", str(empty), "--config", str(missing)], "missing"),
        (["data", "synth", str(tmp_path / "afile" / "demo")], "afile"),
        (["run", "--resume", "no-such-run"], "no-such-run"),
        (["run", "--data-dir", str(missing)], "missing"),
        (["run", "--data-dir", str(empty)], "no train/"),
        (["run", "--config", str(binary)], "binary.yaml"),
        (["run", "--profile", "nope"], "nope"),
        (["promote", "999"], "version=999"),
        (["promote", "--force"], "--reason"),
        (["predict", str(tmp_path / "afile"), "--model", "models:/cxr-pneumonia/999"], "999"),
        (["predict", str(missing)], "missing"),
        (["tune", "chief", "--work-dir", str(empty), "--oracle-ip", "127.0.0.1",
          "--oracle-port", "1"], "--data-dir"),
        (["tune", "worker", "--work-dir", str(empty), "--tuner-id", "tuner0", "--oracle-ip",
          "127.0.0.1", "--oracle-port", "1", "--wait-s", "0"], "prepared_manifest"),
        (["deploy", "--no-schedule"], "Prefect server"),
    ]
    for args, name in cases:
        _expect_exit(args, cli_env, 2, name)


def test_unreachable_services_exit_2_with_their_address(tmp_path: Path, cli_env) -> None:
    mlflow = _dead_url()
    env = {**cli_env, "CXR_TRACKING_URI": mlflow}
    for args in (["models", "list"], ["promote"], ["rollback"]):
        _expect_exit(args, env, 2, mlflow)
    prefect = _dead_url()
    _expect_exit(["deploy", "--data-dir", str(tmp_path)],
                 {**cli_env, "CXR_PREFECT_API_URL": f"{prefect}/api"}, 2, prefect)


def test_rejections_exit_1(cli_env) -> None:
    _expect_exit(["rollback"], cli_env, 1, "previous-champion")


def test_promote_unknown_version_prints_no_traceback(tmp_path: Path, cli_env) -> None:
    """The console script itself (stderr as a user sees it)."""
    env = {k: v for k, v in {**os.environ, **cli_env}.items() if v is not None}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "promote", "999"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "version=999" in out.stderr


def test_json_out_is_written_for_bad_input(tmp_path: Path, cli_env) -> None:
    """Schedulers read --json-out for every outcome; a stale file would lie."""
    out = tmp_path / "result.json"
    out.write_text('{"outcome": "registered"}')  # from an earlier run
    _expect_exit(["run", "--profile", "nope", "--json-out", str(out)], cli_env, 2, "nope")
    record = json.loads(out.read_text())
    assert record["outcome"] == "error" and record["exit_code"] == 2
    assert "nope" in record["reason"] and record["model_version"] is None


def test_resume_with_other_inputs_is_refused(tmp_path: Path, cli_env, good_dataset) -> None:
    from cxr_core.config import load_config
    from flows.run_spec import create_run

    spec = create_run(Path(cli_env["CXR_HOME"]) / "runs", good_dataset, "quick",
                      load_config(None, "quick"))
    _expect_exit(["run", "--resume", spec.name, "--profile", "full"], cli_env, 2,
                 "profile 'full'", spec.resume_command)


# --- promote: the regression alpha comes from the config, as for the retrain gate -------------

def test_promote_takes_regression_alpha_from_config(tmp_path: Path, cli_env) -> None:
    from cxr_core.lifecycle.registry import CHAMPION
    from cxr_core.lifecycle.tracking import make_client
    from support.registry import champion_and_weaker_challenger, tiny_model_dir

    client = make_client(cli_env["CXR_TRACKING_URI"])
    v1, v2 = champion_and_weaker_challenger(client, tiny_model_dir(tmp_path / "model"),
                                            "cxr-pneumonia")
    # shipped alpha 0.05: p 0.031 regresses; the refusal points at the report explaining it
    _expect_exit(["promote"], cli_env, 1, "regresses", f"promotion/vs-champion-v{v1}.md")
    lenient = tmp_path / "alpha.yaml"
    lenient.write_text("gates: {regression_alpha: 0.01}\n")
    res = runner.invoke(app, ["promote", "--config", str(lenient)], env=cli_env)
    assert res.exit_code == 0, res.output
    assert f"champion -> version {v2} (previous-champion: {v1})" in res.output
    assert "side-by-side report: runs:/" in res.output and f"vs-champion-v{v1}.md" in res.output
    assert str(client.get_model_version_by_alias("cxr-pneumonia", CHAMPION).version) == v2


# --- deploy: a schedule needs a data folder ---------------------------------------------------

def test_a_scheduled_retrain_needs_a_data_folder(cli_env) -> None:
    from cxr_core.errors import InputError
    from flows.deploy import deployment_specs

    with pytest.raises(InputError, match="data folder"):
        deployment_specs("0 3 * * 1", None, "full", "cpu", "gpu")
    specs = deployment_specs("0 3 * * 1", "/data", None, "cpu", "gpu")
    scheduled = specs[0]
    assert scheduled.cron and scheduled.parameters == {"data_dir": "/data"}
    assert scheduled.concurrency_limit == 1  # the same limits as prefect deploy --all
    # One name per deployment whatever the pools are called; the worker deployment is the
    # one the settings look for.
    from cxr_core.settings import Settings

    renamed = deployment_specs(None, None, None, "cpu2", "gpu-a100")
    assert [s.full_name for s in renamed] == [s.full_name for s in specs] == [
        "retrain/scheduled", "promote/promote", "batch-predict/batch-predict", "tune-worker/gpu"]
    assert Settings().tuner_worker_deployment == "tune-worker/gpu"
    assert renamed[3].pool == "gpu-a100" and renamed[0].cron is None
    assert all(":" in s.entrypoint and ".py" not in s.entrypoint for s in specs)  # no paths
    _expect_exit(["deploy"], {**cli_env, "CXR_PREFECT_API_URL": _dead_url() + "/api"}, 2,
                 "--data-dir")


def test_prefect_yaml_schedules_only_with_a_data_folder() -> None:
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    scheduled = [d for d in spec["deployments"] if d.get("schedules")]
    assert scheduled
    for d in scheduled:
        assert (d.get("parameters") or {}).get("data_dir"), d["name"]


def test_prefect_run_logs_drop_tracebacks_of_expected_errors_only() -> None:
    """Prefect logs a failed task or flow run with its traceback; the command line keeps the
    message for expected errors (the command prints them once) and the traceback for bugs."""
    import logging
    import sys

    from cxr_core.errors import DataValidationError
    from flows.cli.common import RUN_LOGGERS, quiet_expected_tracebacks

    quiet_expected_tracebacks()
    quiet_expected_tracebacks()  # idempotent
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        assert len(logger.filters) == len(set(map(id, logger.filters)))
        for exc, kept in ((DataValidationError("3 unreadable files"), False), (KeyError("bug"), True)):
            try:
                raise exc
            except Exception:
                record = logger.makeRecord(name, logging.ERROR, __file__, 1, "failed: %r", (exc,),
                                           sys.exc_info())
            assert logger.filter(record)
            assert (record.exc_info is not None) is kept
            assert repr(exc) in record.getMessage()


# --- external sets and the calibration sample: refused before anything runs ------------------

def test_bad_external_sets_exit_2_before_anything_runs(tmp_path: Path, cli_env) -> None:
    from support.images import make_good_dataset
    from support.registry import tiny_model_dir

    good = make_good_dataset(tmp_path / "site", n_patients=1, imgs=1)
    missing = tmp_path / "missing"
    gated = tmp_path / "gated.yaml"
    gated.write_text("gates: {external: {site-x: {min_recall: 0.9}}}\n")
    (tmp_path / "afile").write_text("x")
    cases = [
        (["run", "--external", "site-b"], "expected NAME=DIR"),
        (["run", "--external", "Site=" + str(good)], "lowercase"),
        (["run", "--external", f"b={good}", "--external", f"b={missing}"], "given twice"),
        (["run", "--external", f"b={missing}"], f"external set 'b': {missing}"),
        (["run", "--config", str(gated), "--external", f"b={good}"], "'site-x'"),
        (["run", "--calibration", str(missing)], "--calibration"),
        (["run", "--unlabeled", str(missing)], f"--unlabeled {missing}: no such folder"),
        (["predict", str(tmp_path / "afile"), "--threshold", "best"], "--threshold"),
        (["predict", str(tmp_path / "afile"), "--model", str(tiny_model_dir(tmp_path / "m")),
          "--threshold", "site"], "no site threshold"),
    ]
    for args, name in cases:
        _expect_exit(args, cli_env, 2, name)
    assert not (tmp_path / "home" / "runs").exists()  # no run was started


def test_the_cli_gives_prefects_temporary_server_time_to_start(monkeypatch) -> None:
    """A first `cxr run` migrates a new Prefect database; Prefect's 20 s default was too
    short on a busy 2-core machine. A user's own setting wins."""
    import flows.cli as cli

    key = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    seen: list[str | None] = []
    monkeypatch.setattr(cli, "app", lambda: seen.append(os.environ.get(key)))
    monkeypatch.setenv(key, "")
    monkeypatch.delenv(key)
    cli.main()
    monkeypatch.setenv(key, "45")
    cli.main()
    assert int(seen[0]) >= 120 and seen[1] == "45"
