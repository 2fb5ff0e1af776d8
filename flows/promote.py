"""The promote flow: champion/challenger comparison and the alias move."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from cxr_core.config import load_config
from cxr_core.lifecycle.promotion import promote, promotion_report
from cxr_core.settings import get_settings
from flows.tasks import IO_RETRIES, mlflow_client


@task(name="promote", **IO_RETRIES)
def promote_task(tracking_uri: str, model_name: str, version: str | None, force: bool,
                 reason: str | None, alpha: float) -> dict[str, Any]:
    client = mlflow_client(tracking_uri)
    result = promote(client, model_name, version, force=force, reason=reason, alpha=alpha)
    return {"promoted_version": result.promoted_version,
            "previous_champion": result.previous_champion, "forced": result.forced,
            "comparison": result.comparison,
            "report": promotion_report(client, model_name, result.promoted_version)}


@flow(name="promote", log_prints=True)
def promote_flow(version: str | None = None, force: bool = False, reason: str | None = None,
                 config: str | None = None, profile: str | None = None) -> dict[str, Any]:
    """Promote the challenger (or ``version``) to champion; Failed with the reason if refused.
    The comparison with the champion uses the config's gates.regression_alpha, as the
    retrain gate does."""
    settings = get_settings()
    alpha = load_config(Path(config) if config else None, profile).gates.regression_alpha
    out = promote_task(settings.mlflow_tracking_uri, settings.registered_model_name, version,
                       force, reason, alpha)
    create_markdown_artifact(
        key="promotion",
        markdown=f"# Promotion\n\nchampion -> version {out['promoted_version']} "
                 f"(previous: {out['previous_champion']}, forced: {out['forced']})\n\n"
                 f"Comparison (alpha {alpha}): `{out['comparison']}`\n\n"
                 f"Side-by-side report (MLflow, the version's run): {out['report'] or 'none'}")
    return out
