"""A Keras Tuner worker as a flow, so the retrain flow can start workers on the `gpu` work
pool with run_deployment while the chief serves the oracle beside it."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from cxr_core.config import load_config
from cxr_core.settings import temporary_env
from cxr_core.training.search import run_worker


@flow(name="tune-worker", log_prints=True)
def tune_worker_flow(work_dir: str, tuner_id: str, oracle_ip: str, oracle_port: int,
                     profile: str = "quick", config: str | None = None,
                     wait_s: float = 600.0, live_tracking: dict[str, str] | None = None) -> int:
    """Run trials handed out by the chief at ``oracle_ip:oracle_port`` over the shared
    ``work_dir``; returns how many trials this worker ran. ``live_tracking``: the environment
    of :meth:`cxr_core.lifecycle.tracking.LiveTracking.env`, so each trial this worker runs
    is a nested MLflow run of the pipeline's parent run while it trains."""
    cfg = load_config(Path(config) if config else None, profile)
    with temporary_env(live_tracking or {}):
        trials = run_worker(Path(work_dir), cfg, tuner_id, oracle_ip, oracle_port, wait_s)
    mine = [t for t in trials if t.tuner_id == tuner_id]
    print(f"worker {tuner_id}: ran {len(mine)} of {len(trials)} trials")
    return len(mine)
