"""The ``cxr`` command line: the user's front door, one module per command group.

Commands stay thin: they resolve settings and config, call ``cxr_core`` (or launch a flow)
and turn outcomes into exit codes: 0 success, 1 rejected (data or gate), 2 bad usage/input.
"""

from __future__ import annotations

import typer

from flows.cli import data, deploy, models, predict, run, stack, tune

app = typer.Typer(
    help="cxr: train, gate, register and promote pneumonia-vs-normal chest X-ray classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _use_stack_when_up() -> None:
    """cxr: train, gate, register and promote pneumonia-vs-normal chest X-ray classifiers."""
    from cxr_core.settings import get_settings
    from flows.stack import apply_stack_env

    apply_stack_env(get_settings())


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

    # Quiet third-party chatter on a terminal; users can override any of these.
    for key, value in {"GX_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2",
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
        os.environ.setdefault(key, value)
    app()

