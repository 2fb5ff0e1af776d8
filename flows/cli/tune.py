"""``cxr tune chief|worker``: Keras Tuner's distributed search by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import EXIT_BAD_INPUT, ConfigOpt, ProfileOpt, fail, load_cfg

app = typer.Typer(
    help="Distributed hyperparameter search: one chief serves Keras Tuner's oracle, workers "
    "(e.g. one per GPU) run trials, all over one shared work directory.",
    no_args_is_help=True,
)

WorkDirOpt = Annotated[Path, typer.Option(
    "--work-dir", help="Shared directory (same path for chief and every worker): prepared "
    "manifest, augmented images and tuner state.")]
OracleIpOpt = Annotated[str | None, typer.Option(
    "--oracle-ip", envvar="KERASTUNER_ORACLE_IP", help="Chief's address.")]
OraclePortOpt = Annotated[int | None, typer.Option(
    "--oracle-port", envvar="KERASTUNER_ORACLE_PORT", help="Chief's port.")]


def _oracle(ip: str | None, port: int | None) -> tuple[str, int]:
    if not ip or not port:
        fail("--oracle-ip and --oracle-port (or KERASTUNER_ORACLE_IP/PORT) are required",
             EXIT_BAD_INPUT)
    return ip, port


@app.command("chief")
def tune_chief(
    work_dir: WorkDirOpt,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Data set to prepare (scan, split, validate, balance) unless the "
        "work dir already holds a prepared manifest.")] = None,
    oracle_ip: OracleIpOpt = None,
    oracle_port: OraclePortOpt = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="Workers expected (tuner0..tunerN-1): the chief waits for each to "
        "connect, or to be reported gone, before it finishes.")] = 0,
    join_timeout: Annotated[float, typer.Option(
        help="Seconds to wait for expected workers that never connect.")] = 600.0,
) -> None:
    """Prepare the data once, then serve the search's oracle until every worker is done
    (Keras Tuner distributed mode). Prints the best trial."""
    from cxr_core.data.balance import PREPARED_MANIFEST
    from cxr_core.stages import prepare_stage
    from cxr_core.training.search import role, tune_from_manifest

    cfg = load_cfg(config, profile)
    oracle = _oracle(oracle_ip, oracle_port)
    prepared = (work_dir / PREPARED_MANIFEST).is_file()
    if not prepared and data_dir is None:
        fail(f"{work_dir / PREPARED_MANIFEST} does not exist: give --data-dir", EXIT_BAD_INPUT)
    with role("chief", *oracle):
        if not prepared:
            prepare_stage(data_dir, cfg, work_dir)
        _, trials = tune_from_manifest(work_dir, cfg, chief=True,
                                       expected_workers=[f"tuner{i}" for i in range(workers)],
                                       join_timeout_s=join_timeout)
    _print_trials(trials)


@app.command("worker")
def tune_worker(
    work_dir: WorkDirOpt,
    tuner_id: Annotated[str, typer.Option(
        "--tuner-id", envvar="KERASTUNER_TUNER_ID", help="This worker's id (tuner0, tuner1, ...).")
    ] = "tuner0",
    oracle_ip: OracleIpOpt = None,
    oracle_port: OraclePortOpt = None,
    wait_s: Annotated[float, typer.Option(help="How long to wait for the chief's data.")] = 600.0,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Run trials handed out by the chief until the search's budget is spent. Use the same
    --config/--profile as the chief."""
    from cxr_core.training.search import run_worker

    cfg = load_cfg(config, profile)
    ip, port = _oracle(oracle_ip, oracle_port)
    trials = run_worker(work_dir, cfg, tuner_id, ip, port, wait_s)
    mine = sum(t.tuner_id == tuner_id for t in trials)
    typer.echo(f"worker {tuner_id} done: ran {mine} of {len(trials)} trials")


def _print_trials(trials) -> None:
    scored = [t for t in trials if t.score is not None]
    typer.echo(f"{len(trials)} trial(s), {len(scored)} scored")
    for t in sorted(scored, key=lambda t: t.score, reverse=True)[:5]:
        typer.echo(f"  trial {t.trial_id}: score {t.score:.4f} {t.hyperparameters}")
