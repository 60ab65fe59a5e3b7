"""The `recgw` command: serve, dev, upload, creds."""

from __future__ import annotations

import typer

from recgw_server import cli_client

app = typer.Typer(
    help="recgw: a gRPC gateway that streams call recordings into the customer's S3 bucket.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
cli_client.register(app)


def main() -> None:
    app()
