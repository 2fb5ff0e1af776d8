"""What every ``cxr`` command shares: option types, the error exit, config and client loading."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from cxr_core.errors import CxrError

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="Experiment YAML merged over the shipped defaults.",
                 exists=True, dir_okay=False),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", help="Named profile: 'quick' (synthetic demo) or 'full' (real data)."),
]


def fail(message: str, code: int) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with ``code`` (1 rejected, 2 bad input)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def load_cfg(config: Path | None, profile: str | None) -> Any:
    """The experiment config, or exit 2 with the reason (unknown profile, bad YAML)."""
    from cxr_core.config import load_config

    try:
        return load_config(config, profile)
    except CxrError as exc:
        fail(str(exc), 2)


def registry_client() -> tuple[Any, Any]:
    """(settings, MlflowClient on the configured tracking URI)."""
    from cxr_core.lifecycle.tracking import make_client
    from cxr_core.settings import get_settings

    settings = get_settings()
    return settings, make_client(settings.mlflow_tracking_uri)
