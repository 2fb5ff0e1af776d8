"""``cxr stack``: the local MLflow / Prefect / S3 stack as background processes."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.common import EXIT_BAD_INPUT, fail

app = typer.Typer(help="The local stack on 127.0.0.1: MLflow server, Prefect server and "
                  "optionally an S3 endpoint, as background processes.",
                  no_args_is_help=True)


@app.command("up")
def stack_up(
    s3: Annotated[bool, typer.Option("--s3", help="Also start an S3 endpoint (moto) for "
                                     "development; MLflow artifacts then go to S3.")] = False,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = 5000,
    prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
) -> None:
    """Start the servers (health-checked) with pid files and logs under <home>/stack; later
    cxr commands use them automatically."""
    from cxr_core.settings import get_settings
    from flows import stack

    try:
        state = stack.up(get_settings(), with_s3=s3, mlflow_port=mlflow_port,
                         prefect_port=prefect_port)
    except (RuntimeError, TimeoutError) as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    for name, svc in state["services"].items():
        typer.echo(f"{name:8s} {svc['url']}  (pid {svc['pid']}, log {svc['log']})")
    typer.echo(f"MLflow UI: {state['services']['mlflow']['url']}/#/experiments")


@app.command("down")
def stack_down() -> None:
    """Stop every stack process and its children."""
    from cxr_core.settings import get_settings
    from flows import stack

    stopped = stack.down(get_settings())
    typer.echo("stopped: " + (", ".join(stopped) or "nothing was running"))


@app.command("status")
def stack_status() -> None:
    """Show each stack service, its process and its health check. Exit 1 if any is down."""
    from cxr_core.settings import get_settings
    from flows import stack

    rows = stack.status(get_settings())
    if not rows:
        typer.echo("the stack is not running (cxr stack up)")
        raise typer.Exit(1)
    for svc, alive, healthy in rows:
        typer.echo(f"{svc.name:8s} {svc.url:32s} pid {svc.pid:<7d} "
                   f"{'running' if alive else 'DEAD':8s} {'healthy' if healthy else 'UNHEALTHY'}")
    raise typer.Exit(0 if all(h for _, _, h in rows) else 1)
