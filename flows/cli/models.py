"""``cxr models list``, ``cxr promote`` and ``cxr rollback``: the registry and its aliases."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from flows.cli.common import EXIT_BAD_INPUT, ConfigOpt, ProfileOpt, fail, load_cfg, registry_client

app = typer.Typer(help="The model registry: versions, aliases and key metrics.",
                  no_args_is_help=True)


@app.command("list")
def models_list() -> None:
    """List registered versions (newest first) with aliases, gate verdict, threshold, test
    metrics, and each external set's accuracy, recall and ROC-AUC (and a site threshold)."""
    from cxr_core.lifecycle.registry import list_versions

    settings, client = registry_client()
    versions = list_versions(client, settings.registered_model_name)
    if not versions:
        typer.echo(f"no versions of {settings.registered_model_name!r} at "
                   f"{settings.mlflow_tracking_uri}")
        return
    typer.echo(f"{'version':>7}  {'aliases':28} {'gates':6} {'threshold':>9}  metrics")
    for v in versions:
        metrics = ", ".join(f"{k} {val:.3f}" for k, val in sorted(v.metrics.items()))
        threshold = f"{v.threshold:.4f}" if v.threshold is not None else "-"
        typer.echo(f"{v.version:>7}  {','.join(v.aliases) or '-':28} "
                   f"{'pass' if v.gate_passed else 'FAIL':6} {threshold:>9}  test: {metrics}")
        for line in _external_lines(v):
            typer.echo(f"{'':>55}{line}")


def _external_lines(v: Any) -> list[str]:
    """Per external set its accuracy, recall and ROC-AUC; the site threshold, if any."""
    lines = [f"external {name}: " + ", ".join(f"{k} {m[k]:.3f}" for k in
                                              ("accuracy", "recall", "roc_auc") if k in m)
             for name, m in sorted(v.external.items())]
    if v.site_threshold is not None:
        lines.append(f"site threshold {v.site_threshold:.4f}")
    return lines


def promote_cmd(
    version: Annotated[str | None, typer.Argument(
        help="Version to promote (default: the 'challenger' alias).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Promote despite a failed or impossible champion comparison "
        "(never despite failed gates). Needs --reason.")] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="Recorded on the version.")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Compare the challenger (or VERSION) with the champion on the same test images
    (McNemar at the config's gates.regression_alpha, as the retrain gate does), then move
    'champion' to it and keep the old one as 'previous-champion', with audit tags (who, when,
    why, comparison). Exit 1 when the comparison refuses, 2 for an unknown version."""
    from cxr_core.lifecycle.promotion import promote, promotion_report

    if force and not reason:
        fail("--force needs --reason (it is recorded on the version)", EXIT_BAD_INPUT)
    alpha = load_cfg(config, profile).gates.regression_alpha
    settings, client = registry_client()
    result = promote(client, settings.registered_model_name, version, force=force,
                     reason=reason, alpha=alpha)
    typer.echo(f"champion -> version {result.promoted_version}"
               + (f" (previous-champion: {result.previous_champion})"
                  if result.previous_champion else "") + (" [forced]" if result.forced else ""))
    if result.comparison:
        c = result.comparison
        typer.echo(f"  on {c['shared_images']} shared test images: accuracy "
                   f"{c['candidate_accuracy']:.3f} vs {c['champion_accuracy']:.3f}")
    report = promotion_report(client, settings.registered_model_name, result.promoted_version)
    if report:
        typer.echo(f"  side-by-side report: {report} (MLflow UI: the version's source run, Artifacts)")


def rollback_cmd(
    reason: Annotated[str | None, typer.Option("--reason", help="Recorded on the version.")] = None,
) -> None:
    """Restore 'previous-champion' as 'champion' (the replaced version becomes
    'previous-champion', so a rollback can be undone)."""
    from cxr_core.lifecycle.promotion import rollback

    settings, client = registry_client()
    result = rollback(client, settings.registered_model_name, reason=reason)
    typer.echo(f"champion -> version {result.promoted_version} (was {result.previous_champion})")
