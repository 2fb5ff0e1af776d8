"""Fixtures of the flow tests: the Prefect test harness (one per module that asks for it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """A Prefect server for this module (the test harness, sqlite in a temporary
    PREFECT_HOME); yields the path of its database file."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL
    from prefect.testing.utilities import prefect_test_harness

    # Prefect configures its console logging on the first import of its flow API: do it here,
    # outside any test's captured streams (capsys), which are closed after that test.
    import flows.retrain  # noqa: F401

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    with prefect_test_harness(server_startup_timeout=90):
        url = PREFECT_API_DATABASE_CONNECTION_URL.value() or ""
        assert url.startswith("sqlite"), url  # the harness keeps its database in a file
        yield Path(url.split(":///", 1)[-1])
