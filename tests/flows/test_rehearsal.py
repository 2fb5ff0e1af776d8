"""A rehearsal of production (issue 14): the compose stack as real processes on 127.0.0.1
(PostgreSQL behind MLflow with basic auth and behind Prefect, a moto S3 endpoint, a cpu and a
gpu process worker), the deployments from prefect.yaml, and the retrain deployment triggered
through the Prefect API with two tuner workers; one tuner worker is killed mid-search and the
search still finishes; a second trigger waits for the first (concurrency 1), then is
cancelled. Lean: tiny images, six one-epoch trials, one full retrain."""

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

pytestmark = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get(POSTGRES_ENV), reason=f"set {POSTGRES_ENV}"),
]

MAX_TRIALS = 6  # enough that trials remain when the first worker to finish one is killed
TINY = {"data": {"image_size": 32, "min_val_images": 0},
        "validation": {"min_width": 16, "min_height": 16, "min_images_per_class": 2},
        "tune": {"algorithm": "random", "max_trials": MAX_TRIALS, "max_epochs": 1},
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


def _tuner_runs(client: Any) -> list[Any]:
    """The runs of the tune-worker deployment, oldest first."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
        name=DeploymentFilterName(any_=["gpu"])))
    return sorted(runs, key=lambda r: r.created)


def _done_by(run_dir: Path) -> dict[str, str]:
    """trial id -> the tuner id that completed it: trials the chief has recorded COMPLETED
    (trial.json), with the worker that wrote their epochs. A trial whose worker died before
    reporting it is not done: the chief hands it to another worker, which rewrites it."""
    done = {}
    for trial in sorted(run_dir.glob("tuner/search/trial_*/trial.json")):
        epochs = trial.parent / "epochs.json"
        try:
            if json.loads(trial.read_text()).get("status") == "COMPLETED" and epochs.is_file():
                done[trial.parent.name] = json.loads(epochs.read_text())["tuner_id"]
        except json.JSONDecodeError:  # being written
            continue
    return done


def _run_dir(prod: Any) -> Path | None:
    runs = [p for p in (Path(prod.env["CXR_HOME"]) / "runs").glob("*") if p.is_dir()]
    return runs[0] if len(runs) == 1 else None


def _processes_of(flow_run_id: str) -> list[int]:
    """The pids whose environment names this flow run (Prefect sets PREFECT__FLOW_RUN_ID)."""
    mark = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return pids


def _deploy(prod: Any, data: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--profile", "quick",
                          "--data-dir", str(data)], env=prod.env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tune-worker/gpu on pool gpu" in out.stdout and "concurrency 1" in out.stdout


def test_production_rehearsal(tmp_path: Path, monkeypatch) -> None:
    """Long because it is one scenario: deploy, two triggers, a worker killed, the checks."""
    from contextlib import ExitStack

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    started = time.monotonic()
    data = make_good_dataset(tmp_path / "data", n_patients=8, imgs=2)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps(TINY))
    bounded = {"CXR_TUNER_WORKER_START_TIMEOUT_S": "120", "CXR_TUNER_WORKER_JOIN_TIMEOUT_S": "120"}
    with production_stack(tmp_path, bounded) as prod, ExitStack() as workers, \
            temporary_settings({PREFECT_API_URL: prod.prefect_url}), \
            get_client(sync_client=True) as client:
        _deploy(prod, data)
        start_worker(prod, workers, "cpu", 2)
        start_worker(prod, workers, "gpu", 2)

        def logs() -> str:
            return "\n".join(f"--- {n}\n{prod.log(n)}" for n in ("worker-cpu", "worker-gpu", "mlflow"))

        params = {"data_dir": str(data), "config": str(cfg), "profile": "quick", "tuner_workers": 2}
        first = run_deployment("retrain/scheduled", parameters=params, timeout=0)
        _wait("first retrain running", lambda: _state(client, first.id).is_running(), 240, logs)
        second = run_deployment("retrain/scheduled", parameters=params, timeout=0)
        run_dir = _wait("the first retrain's work directory", lambda: _run_dir(prod), 60, logs)
        victim = _kill_first_worker_to_finish_a_trial(client, run_dir, logs)
        # Concurrency limit 1: the second trigger waits while the first runs (the cpu worker,
        # limit 2, has polled several times by now).
        assert not _state(client, second.id).is_running()
        _wait("first retrain finished", lambda: _state(client, first.id).is_final(), 420, logs, 2)
        assert _state(client, first.id).is_completed(), logs()
        assert not _state(client, victim).is_completed()
        _check_first_run(prod, run_dir, monkeypatch)
        first_end = client.read_flow_run(first.id).end_time
        _wait("second retrain running", lambda: _state(client, second.id).is_running(), 120, logs)
        assert client.read_flow_run(second.id).start_time >= first_end
        client.set_flow_run_state(second.id, Cancelling(), force=True)
        _wait("second retrain cancelled", lambda: _state(client, second.id).is_final(), 120, logs)
    print(f"rehearsal wall time: {time.monotonic() - started:.0f} s")


def _kill_first_worker_to_finish_a_trial(client: Any, run_dir: Path, logs: Any) -> Any:
    """SIGKILL the flow-run process of the first tuner worker to complete a trial, with
    trials left to run: the other worker must finish the search. Returns the killed run's id."""
    done = _wait("a tuner worker completed a trial", lambda: _done_by(run_dir), 300, logs, 0.3)
    tuner_id = next(iter(done.values()))
    (victim,) = [r for r in _tuner_runs(client) if r.parameters.get("tuner_id") == tuner_id]
    # Every process of that flow run (the worker's starter and the engine it runs), as when
    # the machine under it dies: the worker's infrastructure pid alone may be a launcher.
    pids = _processes_of(str(victim.id))
    assert pids, f"no process of flow run {victim.id} found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert len(_done_by(run_dir)) < MAX_TRIALS, "the search ended before a worker was killed"
    _wait("the killed tuner worker's run ended", lambda: _state(client, victim.id).is_final(),
          120, logs)
    return victim.id


def _check_first_run(prod: Any, run_dir: Path, monkeypatch: Any) -> None:
    """Trials on two tuner ids, none twice, each a live nested run; artifacts in S3 through
    MLflow; a registered version with its alias."""
    done = _done_by(run_dir)
    assert (run_dir / "tuner" / "search-done").exists()
    assert len(done) == MAX_TRIALS and set(done.values()) == {"tuner0", "tuner1"}, done

    client = mlflow_client(prod, monkeypatch)
    exp = client.get_experiment_by_name("cxr-pneumonia")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")
    trial_runs = [r for r in client.search_runs([exp.experiment_id])
                  if r.data.tags.get("cxr.stage") == "tuning"]
    finished = [r for r in trial_runs if r.info.status == "FINISHED"]
    assert all("mlflow.parentRunId" in r.data.tags for r in trial_runs)
    # Each worker logged its trials live (the killed one's last trial ended FAILED or RUNNING).
    assert {r.data.tags.get("cxr.tuner_id") for r in finished} == {"tuner0", "tuner1"}
    assert len({r.data.tags["cxr.trial_id"] for r in finished}) == len(finished) == MAX_TRIALS
    version = client.get_model_version_by_alias("cxr-pneumonia", "challenger")
    assert version.version
    keys = s3_keys(prod, "mlflow/")
    assert any(exp.experiment_id in k for k in keys), keys[:20]
    assert any("/artifacts/" in k or "/models/" in k for k in keys), keys[:20]
