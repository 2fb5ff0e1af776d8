"""What every ``cxr`` command shares: option types, exit codes and the one place expected
errors become a message and an exit code, config and client loading."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer
from typer.core import TyperGroup

from cxr_core.errors import CxrError, Rejection, is_transient

EXIT_REJECTED = 1   # validation, gates or promotion said no
EXIT_BAD_INPUT = 2  # bad usage or input, unknown run or version, unreachable service

ConfigOpt = Annotated[
    Path | None,
    # Existence is checked by load_config (ConfigError, exit 2) rather than by click, so a
    # missing file goes through the same path as every other bad input (and --json-out).
    typer.Option("--config", help="Experiment YAML merged over the shipped defaults.",
                 dir_okay=False),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", help="Named profile: 'quick' (synthetic demo) or 'full' (real data)."),
]


def fail(message: str, code: int) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with ``code`` (1 rejected, 2 bad input)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _mlflow_error(exc: BaseException) -> bool:
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    return isinstance(exc, MlflowException)


def exit_code(exc: BaseException) -> int | None:
    """The exit code of an expected error: 1 for a rejection, 2 for bad input, an unknown
    run or model version (MLflow's refusals), a file the system refuses (permissions, a
    file where a folder should be; the error names it) and an unreachable service. None for
    anything else: a bug keeps its traceback."""
    if isinstance(exc, Rejection):
        return EXIT_REJECTED
    if isinstance(exc, CxrError) or _mlflow_error(exc) or is_transient(exc):
        return EXIT_BAD_INPUT
    if isinstance(exc, OSError) and exc.filename is not None:
        return EXIT_BAD_INPUT
    return None


def error_message(exc: BaseException) -> str:
    """One line or paragraph for the user: cxr's own message, MLflow's message without its
    stack, or what could not be reached."""
    if isinstance(exc, CxrError):
        return str(exc)
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if is_transient(exc):
        return f"a service did not answer (check that it is running, then retry): {text}"
    return text


class CxrGroup(TyperGroup):
    """The top-level command group: expected errors from any command end as ``error: ...``
    on stderr with their exit code, never as a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:  # noqa: BLE001 - classified; the rest is re-raised
            code = exit_code(exc)
            if code is None:
                raise
            fail(error_message(exc), code)


class _NoTracebackForExpected(logging.Filter):
    """Drops the traceback Prefect logs with a failed task or flow run when the failure is an
    expected error: the record's message already names it, and the command prints it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and exit_code(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


_EXPECTED_FILTER = _NoTracebackForExpected()
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # where Prefect logs run failures


def quiet_expected_tracebacks() -> None:
    """Install the filter on Prefect's run loggers (idempotent)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if _EXPECTED_FILTER not in logger.filters:
            logger.addFilter(_EXPECTED_FILTER)


def load_cfg(config: Path | None, profile: str | None) -> Any:
    """The experiment config (ConfigError, exit 2, when unknown profile, bad or missing file)."""
    from cxr_core.config import load_config

    return load_config(config, profile)


def registry_client() -> tuple[Any, Any]:
    """(settings, MlflowClient on the configured tracking URI), after one cheap request: an
    unreachable server fails here, in seconds, with its address."""
    from cxr_core.settings import get_settings
    from flows.clients import mlflow_client

    settings = get_settings()
    client = mlflow_client(settings.mlflow_tracking_uri)
    client.search_registered_models(max_results=1)
    return settings, client
