"""`cxr stack up|status|down`, `cxr deploy`, and the retrain flow fanning its search out to
two tuner workers on a process work pool. Slow (servers start in about a minute)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.servers import free_port, spawn_detached, stop_group
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
    for name in ("s3", "mlflow", "prefect"):
        assert name in status.stdout
    assert "UNHEALTHY" not in status.stdout and "DEAD" not in status.stdout
    state = json.loads((home / "stack" / "stack.json").read_text())
    listed = _cxr(["models", "list"], env)
    assert state["services"]["mlflow"]["url"] in listed.stdout  # talks to the stack's server
    for name in ("s3", "mlflow", "prefect"):
        assert (home / "stack" / f"{name}.pid").is_file()
        assert Path(state["services"][name]["log"]).is_file()


def test_deploy_then_retrain_with_two_tuner_workers(stack_env, tmp_path) -> None:
    env, home = stack_env
    data = make_good_dataset(tmp_path / "data", n_patients=10, imgs=2)
    refused = _cxr(["deploy", "--profile", "quick"], env)  # a schedule needs a data folder
    assert refused.returncode == 2 and "--data-dir" in refused.stderr
    dep = _cxr(["deploy", "--profile", "quick", "--data-dir", str(data)], env)
    assert dep.returncode == 0, dep.stdout + dep.stderr
    assert "tune-worker/gpu on pool gpu" in dep.stdout and "cron '0 3 * * 1'" in dep.stdout
    state = json.loads((home / "stack" / "stack.json").read_text())
    worker_env = {**env, "PREFECT_API_URL": state["services"]["prefect"]["url"]}
    worker = spawn_detached("worker", [sys.executable, "-m", "prefect", "worker", "start",
                                       "--pool", "gpu", "--type", "process"],
                            tmp_path / "worker.log", worker_env)
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(json.dumps({
            "data": {"image_size": 32, "min_val_images": 0},
            "validation": {"min_width": 16, "min_height": 16, "min_images_per_class": 2},
            "tune": {"algorithm": "random", "max_trials": 4, "max_epochs": 1},
            "train": {"epochs": 1, "batch_size": 16},
            "gates": {"min_recall": 0.0, "min_accuracy": 0.0}}))
        run = _cxr(["run", "--data-dir", str(data), "--config", str(cfg), "--profile", "quick",
                    "--tuner-workers", "2"], env, timeout=900)
        assert run.returncode == 0, (run.stdout[-3000:] + run.stderr[-3000:]
                                     + (tmp_path / "worker.log").read_text()[-3000:])
    finally:
        stop_group(worker.pid)
    (run_dir,) = [p for p in (home / "runs").iterdir() if (p / "tuner").is_dir()]
    ran_by = [json.loads(f.read_text())["tuner_id"]
              for f in run_dir.glob("tuner/search/trial_*/epochs.json")]
    assert len(ran_by) == 4 and {"tuner0", "tuner1"} <= set(ran_by), ran_by


def test_stack_down_stops_every_process(stack_env) -> None:
    env, home = stack_env
    state = json.loads((home / "stack" / "stack.json").read_text())
    down = _cxr(["stack", "down"], env)
    assert down.returncode == 0 and "mlflow" in down.stdout
    for svc in state["services"].values():
        with pytest.raises(ProcessLookupError):
            os.killpg(int(svc["pid"]), 0)  # the whole group is gone, children included
    assert _cxr(["stack", "status"], env).returncode == 1
