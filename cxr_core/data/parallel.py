"""Process pools that are safe both in plain scripts and next to TensorFlow."""

from __future__ import annotations

import sys
from multiprocessing import get_context
from multiprocessing.context import BaseContext

# Libraries that start threads fork() cannot copy safely into a child.
_THREADED = ("tensorflow", "grpc", "torch", "prefect")


def pool_context() -> BaseContext:
    """fork while no threaded runtime is loaded (fast, and works from scripts without an
    ``if __name__ == "__main__"`` guard); spawn once one is (fork would copy held locks)."""
    if any(name in sys.modules for name in _THREADED):
        return get_context("spawn")
    return get_context("fork")
