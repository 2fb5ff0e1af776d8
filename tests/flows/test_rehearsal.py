"""A rehearsal of production (issue 14): the compose stack as real processes on 127.0.0.1
(PostgreSQL behind MLflow with basic auth and behind Prefect, a moto S3 endpoint, a cpu and a
gpu process worker), the deployments from prefect.yaml, and the retrain deployment triggered
through the Prefect API with two tuner workers. Then one tuner worker is killed mid-search and
the search still finishes. Lean: tiny images, four one-epoch trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from support.images import make_good_dataset
from support.production import mlflow_client, production_stack, s3_keys, start_worker
from support.servers import POSTGRES_ENV

REHEARSAL_ENV = "CXR_REHEARSAL"
# Opt-in until it has passed end to end after its last fix: it took about 14.5 minutes on a
# loaded 2-core machine (issue 14 stays open on that; `CXR_REHEARSAL=1 make test` runs it).
pytestmark = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get(POSTGRES_ENV), reason=f"set {POSTGRES_ENV}"),
    pytest.mark.skipif(not os.environ.get(REHEARSAL_ENV), reason=f"set {REHEARSAL_ENV}=1"),
]

TINY = {"data": {"image_size": 32, "min_val_images": 0},
        "validation": {"min_width": 16, "min_height": 16, "min_images_per_class": 2},
        "tune": {"algorithm": "random", "max_trials": 4, "max_epochs": 1},
        "train": {"epochs": 1, "batch_size": 16},
        "gates": {"min_recall": 0.0, "min_accuracy": 0.0}}


def _wait(what: str, check: Any, timeout: float, logs: Any = None, poll: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{logs() if logs else ''}")


def _state(client: Any, run_id: Any) -> Any:
    return client.read_flow_run(run_id).state


def _tuner_runs(client: Any, parent_task_runs: set, after: Any) -> list[Any]:
    """The tune-worker runs created after ``after``."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
        name=DeploymentFilterName(any_=["gpu"])))
    return sorted((r for r in runs if r.created >= after), key=lambda r: r.created)


def _epochs(run_dir: Path) -> list[str]:
    return [json.loads(f.read_text())["tuner_id"]
            for f in sorted(run_dir.glob("tuner/search/trial_*/epochs.json"))]


def _deploy(prod: Any, data: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--profile", "quick",
                          "--data-dir", str(data)], env=prod.env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tune-worker/gpu on pool gpu" in out.stdout and "concurrency 1" in out.stdout


def test_production_rehearsal(tmp_path: Path, monkeypatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.monotonic()
    data = make_good_dataset(tmp_path / "data", n_patients=8, imgs=2)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps(TINY))
    bounded = {"CXR_TUNER_WORKER_START_TIMEOUT_S": "120", "CXR_TUNER_WORKER_JOIN_TIMEOUT_S": "120"}
    with production_stack(tmp_path, bounded) as prod, \
            temporary_settings({PREFECT_API_URL: prod.prefect_url}):
        from contextlib import ExitStack

        with ExitStack() as workers:
            _deploy(prod, data)
            start_worker(prod, workers, "cpu", 2)
            start_worker(prod, workers, "gpu", 2)

            def logs() -> str:
                return "\n".join(f"--- {n}\n{prod.log(n)}" for n in
                                 ("worker-cpu", "worker-gpu", "mlflow"))

            params = {"data_dir": str(data), "config": str(cfg), "profile": "quick",
                      "tuner_workers": 2}
            with get_client(sync_client=True) as client:
                first = run_deployment("retrain/scheduled", parameters=params, timeout=0)
                _wait("first retrain running", lambda: _state(client, first.id).is_running(),
                      240, logs)
                second = run_deployment("retrain/scheduled", parameters=params, timeout=0)
                time.sleep(15)  # the cpu worker (limit 2) polls every ~10 s and would take it
                # Concurrency limit 1: the second trigger waits while the first runs.
                assert not _state(client, second.id).is_running()
                _wait("first retrain finished", lambda: _state(client, first.id).is_final(),
                      420, logs, poll=2)
                assert _state(client, first.id).is_completed(), logs()
                first_done = client.read_flow_run(first.id).end_time
                assert not _state(client, second.id).is_final()
                _check_first_run(prod, monkeypatch)
                _kill_one_worker_mid_search(client, second.id, first_done, logs)
                _wait("second retrain finished", lambda: _state(client, second.id).is_final(),
                      420, logs, poll=2)
                assert _state(client, second.id).is_completed(), logs()
    print(f"rehearsal wall time: {time.monotonic() - started:.0f} s")


def _check_first_run(prod: Any, monkeypatch: Any) -> None:
    """Trials on two tuner ids, none twice; nested runs and artifacts in S3 through MLflow;
    a registered version with its alias."""
    runs_dir = Path(prod.env["CXR_HOME"]) / "runs"
    (run_dir,) = [p for p in runs_dir.iterdir() if _epochs(p) and (p / "tuner" / "search-done").exists()]
    ran_by = _epochs(run_dir)
    trial_ids = [p.parent.name for p in run_dir.glob("tuner/search/trial_*/epochs.json")]
    assert len(ran_by) == 4 and set(ran_by) == {"tuner0", "tuner1"}, ran_by
    assert len(set(trial_ids)) == len(trial_ids) == 4  # no trial ran twice

    client = mlflow_client(prod, monkeypatch)
    exp = client.get_experiment_by_name("cxr-pneumonia")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([exp.experiment_id])
    nested = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(nested) >= 4, [r.data.tags.get("mlflow.runName") for r in runs]
    version = client.get_model_version_by_alias("cxr-pneumonia", "challenger")
    assert version.version
    keys = s3_keys(prod, "mlflow/")
    assert any(exp.experiment_id in k for k in keys), keys[:20]
    assert any("/artifacts/" in k or "/models/" in k for k in keys), keys[:20]


def _kill_one_worker_mid_search(client: Any, retrain_id: Any, after: Any, logs: Any) -> None:
    """SIGKILL one tuner worker's flow-run process once both are running; the other finishes
    the search (the killed worker's trial is handed to it)."""
    def two_running() -> list[Any]:
        runs = [r for r in _tuner_runs(client, set(), after) if r.state and r.state.is_running()]
        return runs if len(runs) >= 2 and all(r.infrastructure_pid for r in runs) else []

    victim = _wait("two tuner workers of the second retrain running", two_running, 240, logs)[0]
    pid = int(str(victim.infrastructure_pid).rsplit(":", 1)[-1])
    time.sleep(3)  # let it take a trial
    os.kill(pid, signal.SIGKILL)
    _wait("the killed tuner worker's run ended",
          lambda: _state(client, victim.id).is_final(), 120, logs)
    assert not _state(client, victim.id).is_completed()
    assert _state(client, retrain_id).is_running() or _state(client, retrain_id).is_completed()
