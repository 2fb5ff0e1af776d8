"""Stopping a server's process group: it returns once the group is gone, even where the
group's leader is this process's own child (a zombie until waited for)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from flows.servers import spawn_detached, stop_group

# A leader with a child, both alive until signalled: a server and one of its workers.
GROUP = ("import subprocess, sys, time\n"
         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
         "time.sleep(300)\n")
TIMEOUT = 30.0


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("pass_process", [True, False])
def test_stopping_a_group_led_by_our_child_returns_once_it_is_gone(tmp_path: Path,
                                                                   pass_process: bool) -> None:
    proc = spawn_detached("group", [sys.executable, "-c", GROUP], tmp_path / "g.log", None)
    time.sleep(1.0)  # the child started
    assert _group_alive(proc.pid)
    start = time.monotonic()
    stop_group(proc.pid, TIMEOUT, **({"process": proc} if pass_process else {}))
    took = time.monotonic() - start
    assert not _group_alive(proc.pid)
    # Before the fix the zombie leader kept the group 'alive' for the whole timeout.
    assert took < TIMEOUT / 2, f"stop waited {took:.1f} s"
    if pass_process:
        assert proc.returncode == -signal.SIGTERM  # reaped through Popen: the code is kept
