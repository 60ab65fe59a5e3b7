"""The `recgw` command: serve, dev, upload, creds."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from recgw_server import cli_client

app = typer.Typer(
    help="recgw: a gRPC gateway that streams call recordings into the customer's S3 bucket.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
cli_client.register(app)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # boto3/urllib3 at DEBUG would print request details; keep them at INFO or above.
    for noisy in ("botocore", "boto3", "urllib3", "hvac"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="RECGW_CONFIG",
            help="TOML config file; RECGW_* environment variables override it.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Run the gateway (production)."""
    from recgw_server.app import serve as run_server
    from recgw_server.config import ConfigError, load_settings

    try:
        settings = load_settings(config)
    except ConfigError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    _configure_logging(settings.log_level)
    asyncio.run(run_server(settings))


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="Gateway port.")] = 50051,
    s3_port: Annotated[int, typer.Option(help="moto_server (S3) port.")] = 5000,
    vault_port: Annotated[int, typer.Option(help="OpenBao dev server port.")] = 8200,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port; 0 turns it off.")] = 9464,
    data_dir: Annotated[Path, typer.Option(help="Where logs of the stack go.")] = Path(
        ".recgw-dev"
    ),
) -> None:
    """Start a local stack: OpenBao, moto (S3 with IAM on), a demo tenant and the gateway."""
    from recgw_server.dev import DevOptions, run_dev

    _configure_logging("INFO")
    options = DevOptions(
        port=port,
        s3_port=s3_port,
        vault_port=vault_port,
        metrics_port=metrics_port,
        data_dir=data_dir,
    )
    asyncio.run(run_dev(options))


def main() -> None:
    app()
