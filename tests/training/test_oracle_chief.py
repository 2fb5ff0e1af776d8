"""The chief of a distributed search waits for workers that start late, hands a gone worker's
trial to another, and gives up on workers that never connect (bounded). Driven through the
chief's real gRPC service, without training anything."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cxr_core.config import ExperimentConfig, load_config
from cxr_core.training.search import mark_worker_gone


def tiny_config() -> ExperimentConfig:
    """Random search, two trials (nothing is trained here: only the oracle runs)."""
    from cxr_core.config import deep_merge

    return ExperimentConfig.model_validate(deep_merge(load_config(profile="quick").model_dump(), {
        "data": {"image_size": 32}, "tune": {"algorithm": "random", "max_trials": 2}}))


class _Worker:
    """A worker as the chief sees it: CreateTrial / EndTrial calls under one tuner id."""

    def __init__(self, port: int, tuner_id: str) -> None:
        import grpc
        from keras_tuner.src import protos

        self.protos, self.tuner_id = protos, tuner_id
        self.stub = protos.get_service_grpc().OracleStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def create(self) -> Any:
        from keras_tuner.src.engine.trial import Trial

        response = self.stub.CreateTrial(self.protos.get_service().CreateTrialRequest(
            tuner_id=self.tuner_id), wait_for_ready=True, timeout=30)
        return Trial.from_proto(response.trial)

    def fail(self, trial: Any) -> None:
        trial.status = "FAILED"
        self.stub.EndTrial(self.protos.get_service().EndTrialRequest(trial=trial.to_proto()),
                           timeout=30)


def _chief(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expected: list[str],
           join_timeout_s: float = 60.0) -> tuple[threading.Thread, int]:
    from cxr_core.training.oracle import serve_oracle
    from cxr_core.training.search import GONE_DIR, tuner_for
    from flows.servers import free_port

    port = free_port()
    for key, value in {"KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP": "127.0.0.1",
                       "KERASTUNER_ORACLE_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    tuner = tuner_for(tiny_config(), tmp_path)  # random search, 2 trials
    thread = threading.Thread(target=serve_oracle, daemon=True, args=(
        tuner.oracle, expected, tmp_path / "tuner" / GONE_DIR, join_timeout_s, 0.1))
    thread.start()
    return thread, port


def test_the_chief_waits_for_a_late_worker(tmp_path, monkeypatch) -> None:
    thread, port = _chief(tmp_path, monkeypatch, ["tuner0", "tuner1"])
    early = _Worker(port, "tuner0")
    for _ in range(2):  # the early worker takes the whole budget
        early.fail(early.create())
    assert early.create().status == "STOPPED"
    time.sleep(1.0)
    assert thread.is_alive(), "the chief exited before tuner1 connected (keras-tuner's own would)"
    assert _Worker(port, "tuner1").create().status == "STOPPED"  # told to stop, no hang
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_gone_workers_trial_goes_to_another(tmp_path, monkeypatch) -> None:
    thread, port = _chief(tmp_path, monkeypatch, ["tuner0", "tuner1"])
    dying, other = _Worker(port, "tuner0"), _Worker(port, "tuner1")
    lost = dying.create()
    mark_worker_gone(tmp_path, "tuner0")  # what the flow does when the worker's run ends
    time.sleep(1.0)  # the chief polls for gone workers every 0.1 s here
    again = other.create()
    assert again.trial_id == lost.trial_id, "the gone worker's trial was not handed over"
    other.fail(again)
    assert again.trial_id == lost.trial_id, "the gone worker's trial was not handed over"
    mark_worker_gone(tmp_path, "tuner1")  # every worker gone: the chief finishes
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_the_chief_gives_up_on_workers_that_never_connect(tmp_path, monkeypatch) -> None:
    thread, port = _chief(tmp_path, monkeypatch, ["tuner0", "tuner1"], join_timeout_s=2.0)
    only = _Worker(port, "tuner0")
    while (trial := only.create()).status != "STOPPED":
        only.fail(trial)
    thread.join(timeout=10)  # tuner1 never came: bounded by the join timeout
    assert not thread.is_alive()


_CHIEF = """
import os, sys
from pathlib import Path
from cxr_core.config import ExperimentConfig, deep_merge, load_config
from cxr_core.training.oracle import serve_oracle
from cxr_core.training.search import GONE_DIR, tuner_for
work, port = Path(sys.argv[1]), sys.argv[2]
os.environ.update(KERASTUNER_TUNER_ID="chief", KERASTUNER_ORACLE_IP="127.0.0.1",
                  KERASTUNER_ORACLE_PORT=port)
cfg = ExperimentConfig.model_validate(deep_merge(load_config(profile="quick").model_dump(), {
    "data": {"image_size": 32}, "tune": {"algorithm": "random", "max_trials": 2}}))
serve_oracle(tuner_for(cfg, work).oracle, ["tuner0"], work / "tuner" / GONE_DIR, 600.0, 0.2)
"""

# The process that starts the chief (the retrain flow's task), then dies without stopping it.
_PARENT = """
import subprocess, sys, time
from cxr_core.training.oracle import oracle_reachable
chief = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
print(chief.pid, flush=True)
while not oracle_reachable("127.0.0.1", int(sys.argv[3]), 0.5):
    time.sleep(0.2)
"""


def _exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has exited; whether anyone reaps it is not ours


def test_the_chief_stops_when_the_process_that_started_it_is_gone(tmp_path) -> None:
    """A retrain killed during its search leaves no oracle serving (and waiting for workers
    for the whole join timeout) behind it."""
    import subprocess
    import sys

    from flows.servers import free_port

    port = free_port()
    parent = subprocess.run([sys.executable, "-c", _PARENT, _CHIEF, str(tmp_path), str(port)],
                            capture_output=True, text=True, timeout=180)
    assert parent.returncode == 0, parent.stderr[-2000:]
    chief_pid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 30
    while not _exited(chief_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _exited(chief_pid), "the chief kept serving after its parent exited"
