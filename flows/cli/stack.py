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
    gpu_worker: Annotated[bool, typer.Option(
        "--gpu-worker", help="Also start a process worker of the `gpu` pool (tuner workers) "
        "on this machine.")] = False,
    no_workers: Annotated[bool, typer.Option(
        "--no-workers", help="Start no `cpu` worker (scheduled runs then wait).")] = False,
) -> None:
    """Start the servers (health-checked) and a process worker of the `cpu` pool (and of
    `gpu` with --gpu-worker), with pid files and logs under <home>/stack; later cxr commands
    use them automatically. Deploy with `cxr deploy`."""
    from cxr_core.settings import get_settings
    from flows import stack

    try:
        state = stack.up(get_settings(), with_s3=s3, mlflow_port=mlflow_port,
                         prefect_port=prefect_port, gpu_worker=gpu_worker,
                         workers=not no_workers)
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
        typer.echo(f"{svc.name:10s} {svc.url:32s} pid {svc.pid:<7d} "
                   f"{'running' if alive else 'DEAD':8s} {'healthy' if healthy else 'UNHEALTHY'}")
    prefect = next((svc for svc, _, healthy in rows if svc.name == "prefect" and healthy), None)
    if prefect is not None:
        _print_schedule(stack.schedule_status(prefect.url))
    raise typer.Exit(0 if all(h for _, _, h in rows) else 1)


def _print_schedule(info: dict) -> None:
    for pool, workers in sorted(info["pools"].items()):
        names = ", ".join(f"{n} ({s})" for n, s, _ in workers) or "NO WORKER"
        typer.echo(f"pool {pool:8s} workers: {names}")
    nxt = info["next"]
    typer.echo(f"next scheduled run: {nxt['deployment']} at {nxt['at']:%Y-%m-%d %H:%M %Z}"
               if nxt else "next scheduled run: none")
