"""`cxr stack up|status|down` and `cxr deploy` against the local stack (servers and a cpu
worker). Slow (servers start in about a minute). The distributed retrain on real workers is
rehearsed in test_rehearsal.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.servers import free_port
from support.images import make_good_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cxr(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("stack-home")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CXR_", "PREFECT_", "MLFLOW_"))}
    env.update({"CXR_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"})
    up = _cxr(["stack", "up", "--s3", "--mlflow-port", str(free_port()), "--prefect-port",
               str(free_port())], env, timeout=400)
    assert up.returncode == 0, up.stdout + up.stderr
    yield env, home
    _cxr(["stack", "down"], env)


def test_stack_status_and_clients_use_it(stack_env) -> None:
    env, home = stack_env
    status = _cxr(["stack", "status"], env)
    assert status.returncode == 0, status.stdout
    for name in ("s3", "mlflow", "prefect", "worker-cpu"):
        assert name in status.stdout
    assert "UNHEALTHY" not in status.stdout and "DEAD" not in status.stdout
    state = json.loads((home / "stack" / "stack.json").read_text())
    listed = _cxr(["models", "list"], env)
    assert state["services"]["mlflow"]["url"] in listed.stdout  # talks to the stack's server
    for name in ("s3", "mlflow", "prefect"):
        assert (home / "stack" / f"{name}.pid").is_file()
        assert Path(state["services"][name]["log"]).is_file()


def test_stack_runs_a_worker_and_shows_the_next_scheduled_run(stack_env, tmp_path) -> None:
    """`cxr stack up` started a cpu worker (schedules have someone to run them); after
    `cxr deploy`, status lists the workers per pool and the next scheduled retrain."""
    env, home = stack_env
    data = make_good_dataset(tmp_path / "data", n_patients=4, imgs=2)
    refused = _cxr(["deploy", "--profile", "quick"], env)  # a schedule needs a data folder
    assert refused.returncode == 2 and "--data-dir" in refused.stderr
    dep = _cxr(["deploy", "--profile", "quick", "--data-dir", str(data)], env)
    assert dep.returncode == 0, dep.stdout + dep.stderr
    assert "retrain/scheduled on pool cpu, cron '0 3 * * 1', concurrency 1" in dep.stdout
    assert "tune-worker/gpu on pool gpu" in dep.stdout
    state = json.loads((home / "stack" / "stack.json").read_text())
    assert "worker-cpu" in state["services"]
    status = _cxr(["stack", "status"], env)
    assert status.returncode == 0, status.stdout + status.stderr
    pools = {line.split()[1]: line for line in status.stdout.splitlines()
             if line.startswith("pool ")}
    assert "(ONLINE)" in pools["cpu"] and "NO WORKER" in pools["gpu"], status.stdout
    assert "next scheduled run: retrain/scheduled at " in status.stdout, status.stdout


def test_stack_down_stops_every_process(stack_env) -> None:
    env, home = stack_env
    state = json.loads((home / "stack" / "stack.json").read_text())
    down = _cxr(["stack", "down"], env)
    assert down.returncode == 0 and "mlflow" in down.stdout
    for svc in state["services"].values():
        with pytest.raises(ProcessLookupError):
            os.killpg(int(svc["pid"]), 0)  # the whole group is gone, children included
    assert _cxr(["stack", "status"], env).returncode == 1
