"""The `recgw` command: serve, migrate, dev, policy, upload, creds."""

from __future__ import annotations

import asyncio
import json
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
def migrate(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="RECGW_CONFIG",
            help="TOML config file (its data_dir and [sessions]); RECGW_* variables override it.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    from_sqlite: Annotated[
        Path | None,
        typer.Option(
            "--from-sqlite",
            help="Copy every session of this SQLite data dir (or sessions.sqlite3 file) into "
            "the PostgreSQL store; refuses if any of them exists there already.",
            exists=True,
        ),
    ] = None,
) -> None:
    """Bring the session store's schema up to date (`recgw serve` does so at start-up too)."""
    from recgw_server.config import ConfigError, load_store_settings
    from recgw_server.sessions.migrate import MigrateError, migrate_store

    try:
        settings = load_store_settings(config)
        report = asyncio.run(migrate_store(settings, from_sqlite))
    except (ConfigError, MigrateError) as error:
        typer.echo(f"recgw migrate: {error}", err=True)
        raise typer.Exit(1) from None
    for line in report:
        typer.echo(line)


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
    from recgw_server.dev.command import DevOptions, run_dev

    _configure_logging("INFO")
    options = DevOptions(
        port=port,
        s3_port=s3_port,
        vault_port=vault_port,
        metrics_port=metrics_port,
        data_dir=data_dir,
    )
    asyncio.run(run_dev(options))


_POLICY_NOTE = """\
Where each document goes (each put-* call REPLACES what is there: merge with existing ones):
  identity_policy         inline policy of the gateway's IAM user:
                          aws iam put-user-policy --user-name USER --policy-name recgw-uploads \\
                            --policy-document file://identity_policy.json
  bucket_policy           optional second fence, on the bucket:
                          aws s3api put-bucket-policy --bucket {bucket} \\
                            --policy file://bucket_policy.json
  lifecycle_configuration cleans up multipart uploads the gateway could not abort:
                          aws s3api put-bucket-lifecycle-configuration --bucket {bucket} \\
                            --lifecycle-configuration file://lifecycle_configuration.json
Split the output with jq, e.g. jq .identity_policy recgw-policy.json > identity_policy.json
"""
_PLACEHOLDER_NOTE = (
    "bucket_policy: replace {placeholder} with the user's ARN "
    "(aws iam get-user --user-name USER --query User.Arn), or re-run with --principal ARN.\n"
)


@app.command()
def policy(
    bucket: Annotated[str, typer.Option(help="Bucket name (not an ARN).")],
    prefix: Annotated[str, typer.Option(help="Key prefix the gateway writes under.")] = "uploads/",
    principal: Annotated[
        str | None,
        typer.Option(help="ARN of the gateway's IAM user, the bucket policy's principal."),
    ] = None,
    allow_abort: Annotated[
        bool, typer.Option("--allow-abort", help="Also allow s3:AbortMultipartUpload.")
    ] = False,
    allow_confirm: Annotated[
        bool,
        typer.Option(
            "--allow-confirm",
            help="Also allow s3:GetObject, used only for HeadObject, so a completion whose answer "
            "was lost is confirmed instead of reported as unconfirmed (AWS has no "
            "metadata-only permission).",
        ),
    ] = False,
    abort_after_days: Annotated[
        int, typer.Option(help="Lifecycle: abort incomplete multipart uploads after N days.")
    ] = 7,
) -> None:
    """Print the IAM policy, bucket policy and lifecycle rule for a least-privilege set-up."""
    from recgw_server import policy as documents

    try:
        output = {
            "identity_policy": documents.identity_policy(
                bucket, prefix, allow_abort, allow_confirm
            ),
            "bucket_policy": documents.bucket_policy(
                bucket, prefix, principal, allow_abort=allow_abort
            ),
            "lifecycle_configuration": documents.lifecycle_rule(prefix, abort_after_days),
        }
    except ValueError as error:
        typer.echo(f"recgw policy: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(output, indent=2))
    typer.echo(_POLICY_NOTE.format(bucket=bucket), err=True, nl=False)
    if principal is None:
        typer.echo(
            _PLACEHOLDER_NOTE.format(placeholder=documents.PRINCIPAL_PLACEHOLDER),
            err=True,
            nl=False,
        )


def main() -> None:
    app()
