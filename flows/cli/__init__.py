"""The ``cxr`` command line: the user's front door, one module per command group.

Commands stay thin: they resolve settings and config, call ``cxr_core`` (or launch a flow)
and turn outcomes into exit codes: 0 success, 1 rejected (data, gates, promotion), 2 bad
usage or input (missing folder, bad layout, unknown run or version, bad config, unreachable
service). Expected errors print ``error: ...`` and never a traceback (common.CxrGroup).
"""

from __future__ import annotations

import typer

from flows.cli import data, deploy, models, predict, run, stack, tune
from flows.cli.common import CxrGroup, quiet_expected_tracebacks

app = typer.Typer(
    cls=CxrGroup,
    help="cxr: train, gate, register and promote pneumonia-vs-normal chest X-ray classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _setup() -> None:
    """cxr: train, gate, register and promote pneumonia-vs-normal chest X-ray classifiers."""
    from cxr_core.settings import get_settings
    from flows.stack import apply_stack_env

    quiet_expected_tracebacks()
    apply_stack_env(get_settings())  # use the local stack when it is up


app.add_typer(data.app, name="data")
app.command("run")(run.run)
app.add_typer(models.app, name="models")
app.command("promote")(models.promote_cmd)
app.command("rollback")(models.rollback_cmd)
app.command("predict")(predict.predict_cmd)
app.add_typer(stack.app, name="stack")
app.command("deploy")(deploy.deploy_cmd)
app.add_typer(tune.app, name="tune")


def main() -> None:
    """Console-script entry point."""
    import os

    # Quiet third-party chatter on a terminal; users can override any of these. Prefect's
    # temporary server (no PREFECT_API_URL) migrates a new database on its first start: on a
    # busy 2-core machine that took longer than Prefect's 20 s default and `cxr run` failed
    # before doing anything.
    for key, value in {"GX_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2",
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}.items():
        os.environ.setdefault(key, value)
    app()
