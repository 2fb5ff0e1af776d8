"""The chief's side of a distributed search, made safe for workers that start late or never.

Keras Tuner's own chief (``oracle_chief.start_server``) exits as soon as every worker that has
connected *so far* has been told to stop: a worker that starts later then dials a dead port
and waits an hour. A worker that dies mid-trial leaves its trial "ongoing" forever, so the
chief never exits. :func:`serve_oracle` serves the same gRPC servicer, but finishes only when

- every expected worker has connected and been told to stop, or is reported gone
  (``work_dir/tuner/workers-gone/<tuner_id>``, written by whoever starts the workers), or
- ``join_timeout_s`` has passed for workers that never connected (logged),

and it hands a gone worker's ongoing trial to another worker (one retry).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent import futures
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DONE_FILE = "search-done"  # under work_dir/tuner: the chief has finished serving


def search_done(work_dir: Path) -> bool:
    """True once the chief of the search in ``work_dir`` has finished."""
    return (Path(work_dir) / "tuner" / DONE_FILE).is_file()


def _servicer(oracle: Any) -> Any:
    """Keras Tuner's servicer, recording which tuner ids have asked for a trial."""
    from keras_tuner.src.distribute.oracle_chief import OracleServicer

    class _Recording(OracleServicer):
        def __init__(self, oracle: Any) -> None:
            super().__init__(oracle)
            self.seen: set[str] = set()

        def CreateTrial(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC name
            self.seen.add(request.tuner_id)
            return super().CreateTrial(request, context)

    return _Recording(oracle)


def _drop_worker(oracle: Any, tuner_id: str) -> None:
    """Forget a gone worker; its ongoing trial goes back to the queue for another worker."""
    from keras_tuner.src.engine.trial import TrialStatus

    trial = oracle.ongoing_trials.get(tuner_id)
    if trial is not None:
        log.warning("worker %s is gone during trial %s: handing it to another worker",
                    tuner_id, trial.trial_id)
        oracle.max_retries_per_trial = max(oracle.max_retries_per_trial, 1)
        trial.status = TrialStatus.INVALID
        trial.message = f"worker {tuner_id} was gone"
        oracle.end_trial(trial)
    oracle.tuner_ids.discard(tuner_id)


def serve_oracle(oracle: Any, expected: list[str], gone_dir: Path, join_timeout_s: float,
                 poll_s: float = 1.0) -> None:
    """Serve ``oracle`` at KERASTUNER_ORACLE_IP:PORT until the search is over for every
    expected worker (see the module docstring). Bounded by ``join_timeout_s`` for workers
    that never connect; a search whose workers all stay connected runs as long as it needs."""
    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute.oracle_chief import exit_chief

    servicer = _servicer(oracle)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server.add_insecure_port(address)
    server.start()
    log.info("oracle serving at %s for workers %s", address, ", ".join(expected) or "(any)")
    start, dropped, gave_up = time.monotonic(), set(), False
    parent = os.getppid()
    try:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:  # whoever started the chief is gone: nobody reads it
                log.warning("the chief's parent process exited: stopping the oracle")
                return
            gone = {p.name for p in gone_dir.glob("*")} if gone_dir.is_dir() else set()
            for tuner_id in gone - dropped:
                _drop_worker(oracle, tuner_id)
                dropped.add(tuner_id)
            waiting = set(expected) - servicer.seen - gone
            if waiting and not gave_up and time.monotonic() - start > join_timeout_s:
                log.warning("workers %s did not connect within %.0f s: finishing without them",
                            ", ".join(sorted(waiting)), join_timeout_s)
                gave_up = True
            everyone_done = servicer.stop_triggered or (expected and set(expected) <= gone)
            if everyone_done and (gave_up or not waiting) and exit_chief(oracle):
                return
    finally:
        server.stop(grace=5)


def oracle_reachable(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """True when something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_oracle(host: str, port: int, work_dir: Path, timeout_s: float,
                    poll_s: float = 1.0) -> bool:
    """Wait until the chief's oracle answers (True), or the search in ``work_dir`` is already
    over (False: a late worker). Raises after ``timeout_s`` with the address it dialled."""
    from cxr_core.errors import CxrError

    deadline = time.monotonic() + timeout_s
    while True:
        if search_done(work_dir):
            return False
        if oracle_reachable(host, port):
            return True
        if time.monotonic() > deadline:
            raise CxrError(f"the tuner chief's oracle at {host}:{port} did not answer within "
                           f"{timeout_s:.0f} s: is CXR_TUNER_ORACLE_HOST the chief's address "
                           "on this worker's network, and the port open to it?")
        time.sleep(poll_s)
