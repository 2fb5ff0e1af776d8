"""Background servers on 127.0.0.1 (MLflow tracking server, Prefect, moto S3) as process
groups: started detached, health-checked, and stopped with every child they spawned."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A server started in its own process group."""

    name: str
    process: subprocess.Popen
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the whole group (the MLflow server forks workers), then SIGKILL."""
        stop_group(self.process.pid, timeout, self.process)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass


def stop_group(pid: int, timeout: float = 15.0,
               process: subprocess.Popen | None = None) -> None:
    """Stop process group ``pid`` (SIGTERM, then SIGKILL after ``timeout``). ``process``: the
    leader's Popen where this process started it (it is polled, so its exit code is kept)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid, process)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(pid: int, process: subprocess.Popen | None) -> None:
    """Wait for the group's leader if it is this process's child: until then it stays a
    zombie, its group still answers ``killpg(pid, 0)``, and a stop would wait its whole
    timeout for a server that exited at once."""
    if process is not None:
        process.poll()
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: its parent (or init) reaps it
        pass


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout: float = 90.0,
                 log_path: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"server exited with code {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy within {timeout:.0f} s")


def spawn_detached(name: str, cmd: list[str], log_path: Path,
                   env: dict[str, str] | None) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group), output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def start_mlflow_server(backend_store_uri: str, artifacts_destination: str, log_path: Path,
                        host: str = "127.0.0.1", port: int | None = None,
                        env: dict[str, str] | None = None, workers: int = 1,
                        timeout: float = 120.0) -> ServerProcess:
    """``mlflow server`` with proxied artifacts (clients need only the tracking URI).

    S3 destinations take MLFLOW_S3_ENDPOINT_URL and AWS_* from ``env``.
    """
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--artifacts-destination", artifacts_destination, "--host", host, "--port", str(port),
           "--workers", str(workers)]
    proc = spawn_detached("mlflow", cmd, log_path, env)
    url = f"http://{host}:{port}"
    try:
        wait_healthy(f"{url}/health", proc, timeout, log_path)
    except BaseException:
        stop_group(proc.pid, process=proc)
        raise
    return ServerProcess("mlflow", proc, url, log_path)


def start_model_server(model_uri: str, log_path: Path, host: str = "127.0.0.1",
                       port: int | None = None, env: dict[str, str] | None = None,
                       workers: int = 1, timeout: float = 120.0) -> ServerProcess:
    """``mlflow models serve`` of a cxr model (its image pyfunc) in the current environment
    (``--env-manager local``); ``models:/`` URIs need MLFLOW_TRACKING_URI in ``env``."""
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--host", host,
           "--port", str(port), "--workers", str(workers), "--env-manager", "local"]
    # MLflow execs `uvicorn` by name: the interpreter's bin folder must be on PATH (it is not
    # when this Python runs from a virtual environment that was never activated).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {"PATH": path, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **(env or {})}
    proc = spawn_detached("model-server", cmd, log_path, env)
    url = f"http://{host}:{port}"
    try:
        wait_healthy(f"{url}/ping", proc, timeout, log_path)
    except BaseException:
        stop_group(proc.pid, process=proc)
        raise
    return ServerProcess("model-server", proc, url, log_path)
